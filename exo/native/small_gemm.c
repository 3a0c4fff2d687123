/* cblas_sgemm for the few-row products of decoding, drafting, verifying and batched requests;
 * the rest goes to a full BLAS (OpenBLAS).
 *
 * MLX's Linux CPU backend calls cblas_sgemm for every matmul. OpenBLAS handles a product
 * with 1-64 rows (one decode step, a K-token verify, a batch of them) like a big one: it packs
 * the weight matrix per call, and runs at a third of the memory bandwidth. Here a product with
 * at most EXO_SMALL_GEMM_ROWS (64) rows (row-major, any transposes) reads each weight row
 * once. Built by exo/blas.py and loaded before MLX, so MLX's cblas_sgemm resolves here;
 * EXO_BLAS_LARGE names the library everything else goes to.
 *
 * C = A B^T (every nn.Linear) runs in register tiles over blocks of weight rows, OpenMP over
 * the blocks: 2 rows x 4 weight rows for 1-2 rows (memory-bound), else up to 4 rows x 3 weight
 * rows (12 accumulators + 3 weight vectors + 1 row vector = the 16 AVX2 registers), the rows
 * split evenly into tiles of 3-4 (2 for 5). Row independence: every element of C is computed
 * by the same operations in the same order whatever m, its tile or its column: 8-lane
 * accumulators over k in steps of 8 (acc += x * b, contracted to an FMA alike in every tile),
 * then one shared finish() (hsum, the k % 8 tail in order, alpha and beta). So row i of a
 * 64-row product is bitwise the row i of the same product with that row alone, which lossless
 * speculative decoding relies on (a verify must reproduce the decode steps exactly).
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
static int small_rows = 64;

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

/* Compiled once (no inlining, no clones): how the compiler contracts and vectorizes the tail
 * and alpha/beta is then one decision for every tile, so no tile rounds differently. */
#if defined(__clang__)
#define ONE_COPY __attribute__((noinline))
#else
#define ONE_COPY __attribute__((noipa))
#endif

/* Keeps v in a register. Without it gcc feeds one operand of every FMA from memory: 16 loads
 * per 12 FMAs in the 4 x 3 tile instead of 7, which ran at 67 instead of 87 GFLOP/s a core
 * here. Emits nothing and leaves the arithmetic alone. */
#if defined(__AVX__)
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

/* The in x jn outputs of a tile: acc[i * stride + j] holds the 8 lanes of row i, weight row j. */
ONE_COPY static void finish(const v8 *acc, int stride, int in, int jn, const float *const *ap,
                            const float *const *bp, int t, int k, float alpha, float beta, float *c, int ldc) {
  for (int i = 0; i < in; i++)
    for (int j = 0; j < jn; j++) {
      float s = hsum(acc[i * stride + j]);
      for (int u = t; u < k; u++) s += ap[i][u] * bp[j][u];
      put(c + (size_t)i * ldc + j, s, alpha, beta);
    }
}

/* B^T case, 1-2 rows: rows i..i+1 of A (contiguous, length k) against rows j..j+3 of B. */
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
  finish(&acc[0][0], 4, in, jn, ap, bp, t, k, alpha, beta, c, ldc);
}

enum { TILE_ROWS = 4, TILE_COLS = 3 };

/* B^T case, 3+ rows: R (constant once inlined, <= 4) rows of A against rows j..j+2 of B. */
static inline __attribute__((always_inline)) void tile(int R, int jn, int k, float alpha, const float *a, int lda,
                                                       const float *b, int ldb, float beta, float *c, int ldc) {
  v8 acc[TILE_ROWS][TILE_COLS] = {{{0}}};
  const float *bp[TILE_COLS], *ap[TILE_ROWS];
  for (int j = 0; j < TILE_COLS; j++) bp[j] = b + (size_t)(j < jn ? j : 0) * ldb;
  for (int i = 0; i < R; i++) ap[i] = a + (size_t)i * lda;
  int t = 0;
  for (; t + 8 <= k; t += 8) {
    v8 w[TILE_COLS];
    for (int j = 0; j < TILE_COLS; j++) {
      w[j] = load8(bp[j] + t);
      IN_REGISTER(w[j]);
    }
    for (int i = 0; i < R; i++) {
      v8 x = load8(ap[i] + t);
      IN_REGISTER(x);
      for (int j = 0; j < TILE_COLS; j++) acc[i][j] += x * w[j];
    }
  }
  finish(&acc[0][0], TILE_COLS, R, jn, ap, bp, t, k, alpha, beta, c, ldc);
}

typedef void (*tile_fn)(int, int, float, const float *, int, const float *, int, float, float *, int);
#define TILE(R)                                                                                                  \
  static void tile##R(int jn, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta,  \
                      float *c, int ldc) {                                                                       \
    tile(R, jn, k, alpha, a, lda, b, ldb, beta, c, ldc);                                                         \
  }
TILE(2) TILE(3) TILE(4)
/* Indexed by a tile's rows: gemm_bt splits 3+ rows evenly, so a tile has 2-4 of them. */
static const tile_fn tiles[TILE_ROWS + 1] = {NULL, NULL, tile2, tile3, tile4};

/* C = alpha A B^T + beta C, A (m x k) contiguous rows, B (n x k): each row of B read once,
 * kept in L1/L2 while every tile of rows passes over it. */
static void gemm_bt(int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                    float *c, int ldc) {
  if (m <= 2) {
#pragma omp parallel for schedule(static)
    for (int j = 0; j < n; j += 4)
      dot_block(m, n - j < 4 ? n - j : 4, k, alpha, a, lda, b + (size_t)j * ldb, ldb, beta, c + j, ldc);
    return;
  }
  /* Tiles of 3-4 rows run at the same FLOP rate a row; smaller ones are slower (5 = 3 + 2 beats 4 + 1). */
  int tiles_m = (m + TILE_ROWS - 1) / TILE_ROWS;
#pragma omp parallel for schedule(static)
  for (int j = 0; j < n; j += TILE_COLS) {
    int jn = n - j < TILE_COLS ? n - j : TILE_COLS;
    for (int q = 0; q < tiles_m; q++) {
      int i = m * q / tiles_m, rows = m * (q + 1) / tiles_m - i;
      tiles[rows](jn, k, alpha, a + (size_t)i * lda, lda, b + (size_t)j * ldb, ldb, beta, c + (size_t)i * ldc + j,
                  ldc);
    }
  }
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

/* alpha == 0: C = beta C, and A and B are not read (BLAS semantics: 0 * NaN must not reach C);
 * beta == 0 sets C to zero whatever it held. */
static void scale(int m, int n, float beta, float *c, int ldc) {
  if (beta == 1.f) return;
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) c[(size_t)i * ldc + j] = beta == 0.f ? 0.f : beta * c[(size_t)i * ldc + j];
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  if (order != ROW_MAJOR || m > small_rows || m < 1 || n < 1 || k < 1) {
    large_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (alpha == 0.f) {
    scale(m, n, beta, c, ldc);
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
