// y = x @ W for a ternary W[r, c] = (digit(r, c) - 1) * scales[r / block, c], digits in {0, 1, 2}.
// Codes: 2-bit digits, 16 per 32-bit word (digit j at bits 2j), `words` words a row (columns padded to 16
// with digit 1, i.e. t = 0). A thread owns 16 columns (one word a row) and TILE_M rows of x over one slice
// of rows: it unpacks each word in registers, sums x * t over the rows of one scale block, then folds the
// block's scales in. Each slice writes its own partial[slice, m, c]; the caller adds the slices in a fixed
// order, so results do not depend on scheduling (no atomics). TILE_M is 1 at batch 1 (no wasted lanes of
// work) and 4 otherwise (each unpacked digit feeds four rows). No shared memory, shuffles or barriers: the
// same source also compiles as host C++ for a CPU emulation of the grid (tests).
#include "slices.cuh"

#define COLUMNS_PER_WORD 16

// t = d - 1 for a 2-bit digit d without an int-to-float conversion (a reduced-rate instruction): the float
// whose bits are 0x4B000000 | d is exactly 2^23 + d, and 2^23 + d - (2^23 + 1) is exact in float32.
__device__ __forceinline__ float ternary_value(unsigned int digit) {
    return __int_as_float((int)(0x4B000000u | digit)) - 8388609.0f;
}

template <int TILE_M>
__device__ __forceinline__ void ternary_matmul_tile(const float* __restrict__ x, const unsigned int* __restrict__ codes,
                                                    const float* __restrict__ scales, float* __restrict__ partial,
                                                    int rows_x, int depth, int words, int block, int rows_per_slice) {
    ThreadWork work;
    if (!thread_work(words, TILE_M, depth, rows_per_slice, &work)) return;
    const int word = work.worker, m0 = work.m0, end = work.end;
    const int columns = words * COLUMNS_PER_WORD;

    float acc[TILE_M][COLUMNS_PER_WORD];
    for (int m = 0; m < TILE_M; ++m)
        for (int j = 0; j < COLUMNS_PER_WORD; ++j) acc[m][j] = 0.0f;

    for (int first = work.begin; first < end;) {
        const int next_block = (first / block + 1) * block;
        const int last = next_block < end ? next_block : end;  // rows [first, last) share one scale row
        float part[TILE_M][COLUMNS_PER_WORD];
        for (int m = 0; m < TILE_M; ++m)
            for (int j = 0; j < COLUMNS_PER_WORD; ++j) part[m][j] = 0.0f;
#pragma unroll 4
        for (int r = first; r < last; ++r) {
            const unsigned int bits = codes[(size_t)r * words + word];
            float xv[TILE_M];
            for (int m = 0; m < TILE_M; ++m) xv[m] = m0 + m < rows_x ? x[(size_t)(m0 + m) * depth + r] : 0.0f;
            for (int j = 0; j < COLUMNS_PER_WORD; ++j) {
                const float t = ternary_value((bits >> (2 * j)) & 3u);
                for (int m = 0; m < TILE_M; ++m) part[m][j] += xv[m] * t;
            }
        }
        const float* s = scales + (size_t)(first / block) * columns + (size_t)word * COLUMNS_PER_WORD;
        for (int j = 0; j < COLUMNS_PER_WORD; ++j) {
            const float sj = s[j];
            for (int m = 0; m < TILE_M; ++m) acc[m][j] += sj * part[m][j];
        }
        first = last;
    }
    for (int m = 0; m < TILE_M && m0 + m < rows_x; ++m) {
        float* out = partial + work.partial_row(m, rows_x) * columns + (size_t)word * COLUMNS_PER_WORD;
        for (int j = 0; j < COLUMNS_PER_WORD; ++j) out[j] = acc[m][j];
    }
}

#define TERNARY_ARGS                                                                                            \
    const float *__restrict__ x, const unsigned int *__restrict__ codes, const float *__restrict__ scales,     \
        float *__restrict__ partial, int rows_x, int depth, int words, int block, int rows_per_slice
#define TERNARY_CALL x, codes, scales, partial, rows_x, depth, words, block, rows_per_slice

extern "C" __global__ void ternary_matmul_m1(TERNARY_ARGS) { ternary_matmul_tile<1>(TERNARY_CALL); }
extern "C" __global__ void ternary_matmul_m4(TERNARY_ARGS) { ternary_matmul_tile<4>(TERNARY_CALL); }
