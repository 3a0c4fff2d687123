/* cblas_sgemm for the few-row products of decoding, drafting and verifying; the rest goes
 * to a full BLAS (OpenBLAS).
 *
 * MLX's Linux CPU backend calls cblas_sgemm for every matmul. OpenBLAS handles a product
 * with 1-32 rows (one decode step, a K-token verify) like a big one: it packs the weight
 * matrix per call, and runs at a third of the memory bandwidth. Here a product with at most
 * EXO_SMALL_GEMM_ROWS rows (row-major, any transposes) reads each weight row once. Built by
 * exo/blas.py and loaded before MLX, so MLX's cblas_sgemm resolves here; EXO_BLAS_LARGE
 * names the library everything else goes to.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef float v8 __attribute__((vector_size(32)));

static sgemm_fn large_sgemm;
static int small_rows = 32;

__attribute__((constructor)) static void load_large(void) {
  const char *path = getenv("EXO_BLAS_LARGE"), *rows = getenv("EXO_SMALL_GEMM_ROWS");
  if (rows) small_rows = atoi(rows);
  void *lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
  if (lib) large_sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
  if (!large_sgemm) {
    fprintf(stderr, "exo small_gemm: cannot load cblas_sgemm from EXO_BLAS_LARGE=%s: %s\n", path ? path : "(unset)",
            dlerror());
    abort();
  }
}

int exo_small_gemm_rows(void) { return small_rows; }

static inline v8 load8(const float *p) {
  v8 v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline void put(float *c, float v, float alpha, float beta) { *c = beta == 0.f ? alpha * v : alpha * v + beta * *c; }

/* B^T case: rows i..i+1 of A (contiguous, length k) against rows j..j+3 of B. */
static void dot_block(int in, int jn, int k, float alpha, const float *a, int lda, const float *b, int ldb,
                      float beta, float *c, int ldc) {
  v8 acc[2][4] = {{{0}}};
  const float *bp[4], *ap[2];
  for (int j = 0; j < 4; j++) bp[j] = b + (size_t)(j < jn ? j : 0) * ldb;
  for (int i = 0; i < 2; i++) ap[i] = a + (size_t)(i < in ? i : 0) * lda;
  int t = 0;
  for (; t + 8 <= k; t += 8) {
    v8 b0 = load8(bp[0] + t), b1 = load8(bp[1] + t), b2 = load8(bp[2] + t), b3 = load8(bp[3] + t);
    for (int i = 0; i < 2; i++) {
      v8 x = load8(ap[i] + t);
      acc[i][0] += x * b0, acc[i][1] += x * b1, acc[i][2] += x * b2, acc[i][3] += x * b3;
    }
  }
  for (int i = 0; i < in; i++)
    for (int j = 0; j < jn; j++) {
      float s = hsum(acc[i][j]);
      for (int u = t; u < k; u++) s += ap[i][u] * bp[j][u];
      put(c + (size_t)i * ldc + j, s, alpha, beta);
    }
}

/* C = alpha A B^T + beta C, A (m x k) contiguous rows, B (n x k): each row of B read once. */
static void gemm_bt(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                    float *c, int ldc) {
#pragma omp parallel for schedule(static)
  for (int j = 0; j < n; j += 4)
    for (int i = 0; i < m; i += 2)
      dot_block(m - i < 2 ? m - i : 2, n - j < 4 ? n - j : 4, k, alpha, a + (size_t)i * lda, lda,
                b + (size_t)j * ldb, ldb, beta, c + (size_t)i * ldc + j, ldc);
}

/* C = alpha A B + beta C, A (m x k) contiguous rows, B (k x n): columns j..j+15 of C at a time. */
static void gemm_bn(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                    float *c, int ldc) {
  int blocks = (n + 15) / 16;
#pragma omp parallel for schedule(static)
  for (int q = 0; q < blocks; q++) {
    int j = q * 16, width = n - j < 16 ? n - j : 16;
    for (int i = 0; i < m; i += 4) {
      int rows = m - i < 4 ? m - i : 4;
      v8 acc[4][2] = {{{0}}};
      float tail[4][16] = {{0}};
      for (int t = 0; t < k; t++) {
        const float *bt = b + (size_t)t * ldb + j;
        if (width == 16) {
          v8 b0 = load8(bt), b1 = load8(bt + 8);
          for (int r = 0; r < rows; r++) {
            float x = a[(size_t)(i + r) * lda + t];
            acc[r][0] += x * b0, acc[r][1] += x * b1;
          }
        } else {
          for (int r = 0; r < rows; r++) {
            float x = a[(size_t)(i + r) * lda + t];
            for (int w = 0; w < width; w++) tail[r][w] += x * bt[w];
          }
        }
      }
      for (int r = 0; r < rows; r++) {
        float out[16];
        if (width == 16) store8(out, acc[r][0]), store8(out + 8, acc[r][1]);
        else memcpy(out, tail[r], sizeof out);
        float *cr = c + (size_t)(i + r) * ldc + j;
        for (int w = 0; w < width; w++) put(cr + w, out[w], alpha, beta);
      }
    }
  }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  if (order != ROW_MAJOR || m > small_rows || m < 1 || n < 1 || k < 1) {
    large_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  float *packed = NULL;
  if (trans_a != NO_TRANS) { /* A is k x m: copy its m columns into rows (m*k floats, small) */
    packed = malloc(sizeof(float) * (size_t)m * k);
    if (!packed) {
      large_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
    for (int t = 0; t < k; t++)
      for (int i = 0; i < m; i++) packed[(size_t)i * k + t] = a[(size_t)t * lda + i];
    a = packed, lda = k;
  }
  if (trans_b != NO_TRANS) gemm_bt(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  else gemm_bn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  free(packed);
}
