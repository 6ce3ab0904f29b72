// y = x @ W for an integer grid W[r, c] = (q(r, c) - z[r / block, c]) * scales[r / block, c], q of BITS bits
// (2, 4 or 8): MatMulNBits' weights, and ternary ones (2 bits, digits t + 1, z = 1), with their codes still packed.
// Codes: 32 / BITS to a 32-bit word (column j of the word at bits BITS * j), `words` words a row (columns padded
// with q = 0 and scale 0). Zero points: `zero` for every block and column (a symmetric grid's 2^(BITS-1), ternary's
// 1), or, when `zero` is -1, a byte per block and column. A thread owns the columns of one word and TILE_M rows of x
// (1 at batch 1: no wasted work; 4 otherwise: each unpacked code feeds four rows) over one slice of rows: per scale
// block it sums x * (q - z), then folds the block's scales in; slices write their own partials, added in a fixed
// order by the caller (no atomics, deterministic). No shared memory, shuffles or barriers, so the same source also
// runs as host C++ over an emulated grid in the tests.
#include "slices.cuh"

// q - z as a float without an int-to-float conversion: the float whose bits are 0x4B000000 | q is exactly 2^23 + q,
// and offset = 2^23 + z (z < 256) is exact, so the difference is the exact integer q - z.
__device__ __forceinline__ float grid_value(unsigned int code, float offset) {
    return __int_as_float((int)(0x4B000000u | code)) - offset;
}

template <int BITS, int TILE_M>
__device__ __forceinline__ void grid_matmul_tile(const float* __restrict__ x, const unsigned int* __restrict__ codes,
                                                 const float* __restrict__ scales,
                                                 const unsigned char* __restrict__ zero_points,
                                                 float* __restrict__ partial, int rows_x, int depth, int words,
                                                 int block, int zero, int rows_per_slice) {
    constexpr int PER_WORD = 32 / BITS;
    constexpr unsigned int MASK = (1u << BITS) - 1u;
    ThreadWork work;
    if (!thread_work(words, TILE_M, depth, rows_per_slice, &work)) return;
    const int word = work.worker, m0 = work.m0, end = work.end;
    const int columns = words * PER_WORD;

    float acc[TILE_M][PER_WORD];
    for (int m = 0; m < TILE_M; ++m)
        for (int j = 0; j < PER_WORD; ++j) acc[m][j] = 0.0f;

    for (int first = work.begin; first < end;) {
        const int next_block = (first / block + 1) * block;
        const int last = next_block < end ? next_block : end;  // rows [first, last) share one scale row
        const size_t block_row = (size_t)(first / block) * columns + (size_t)word * PER_WORD;
        float offset[PER_WORD];
        for (int j = 0; j < PER_WORD; ++j)
            offset[j] = 8388608.0f + (float)(zero < 0 ? zero_points[block_row + j] : zero);
        float part[TILE_M][PER_WORD];
        for (int m = 0; m < TILE_M; ++m)
            for (int j = 0; j < PER_WORD; ++j) part[m][j] = 0.0f;
#pragma unroll 4
        for (int r = first; r < last; ++r) {
            const unsigned int bits = codes[(size_t)r * words + word];
            float xv[TILE_M];
            for (int m = 0; m < TILE_M; ++m) xv[m] = m0 + m < rows_x ? x[(size_t)(m0 + m) * depth + r] : 0.0f;
            for (int j = 0; j < PER_WORD; ++j) {
                const float t = grid_value((bits >> (BITS * j)) & MASK, offset[j]);
                for (int m = 0; m < TILE_M; ++m) part[m][j] += xv[m] * t;
            }
        }
        const float* s = scales + block_row;
        for (int j = 0; j < PER_WORD; ++j) {
            const float sj = s[j];
            for (int m = 0; m < TILE_M; ++m) acc[m][j] += sj * part[m][j];
        }
        first = last;
    }
    for (int m = 0; m < TILE_M && m0 + m < rows_x; ++m) {
        float* out = partial + work.partial_row(m, rows_x) * columns + (size_t)word * PER_WORD;
        for (int j = 0; j < PER_WORD; ++j) out[j] = acc[m][j];
    }
}

#define GRID_ARGS                                                                                               \
    const float *__restrict__ x, const unsigned int *__restrict__ codes, const float *__restrict__ scales,     \
        const unsigned char *__restrict__ zero_points, float *__restrict__ partial, int rows_x, int depth,     \
        int words, int block, int zero, int rows_per_slice
#define GRID_CALL x, codes, scales, zero_points, partial, rows_x, depth, words, block, zero, rows_per_slice

extern "C" __global__ void grid_matmul_b2_m1(GRID_ARGS) { grid_matmul_tile<2, 1>(GRID_CALL); }
extern "C" __global__ void grid_matmul_b2_m4(GRID_ARGS) { grid_matmul_tile<2, 4>(GRID_CALL); }
extern "C" __global__ void grid_matmul_b4_m1(GRID_ARGS) { grid_matmul_tile<4, 1>(GRID_CALL); }
extern "C" __global__ void grid_matmul_b4_m4(GRID_ARGS) { grid_matmul_tile<4, 4>(GRID_CALL); }
extern "C" __global__ void grid_matmul_b8_m1(GRID_ARGS) { grid_matmul_tile<8, 1>(GRID_CALL); }
extern "C" __global__ void grid_matmul_b8_m4(GRID_ARGS) { grid_matmul_tile<8, 4>(GRID_CALL); }
