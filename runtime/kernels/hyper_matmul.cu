// Matmuls with W in hyperfunction codes: pairs (W[r, c], W[r, c + 1]), c even, are centre + span * T[index],
// T the codebook's float pairs u_j s_k (shared by every tensor of the same codebook), frame = (centre x,
// centre y, span) of the pair's group (one group per tensor, or one per `rows_per_frame` packed rows),
// pair p = (r * C + c) / 2 for W [R, C]. Rounded as the ONNX body rounds
// (a product, then a sum, never fused), so the weights are onnxruntime's bit for bit (up to denormals, which
// CuPy's -ftz=true flushes).
// Indices are a little-endian bit stream in rows of eight (`bits` bytes a row): with C a multiple of 16, a row
// of indices is 16 consecutive elements of one weight row. Indices are cut in registers and the pairs
// gathered from the small table (read-only cache).
// Each slice of the depth writes partial[slice, m, column]; the caller adds the slices in a fixed order.
// TILE_M rows of x a thread: 1 at batch 1, 4 otherwise (`_m1` / `_m4` entry points).
// No shared memory, shuffles or barriers: the source also compiles as host C++ (CPU emulation in tests).
#include "slices.cuh"

#define ELEMENTS_PER_ROW 16
#define INDICES_PER_ROW 8

// One decoded pair: centre + T[index] * span.
__device__ __forceinline__ void decode_pair(const float* __restrict__ table, const float* frame, unsigned int index,
                                            float* first, float* second) {
    *first = __fadd_rn(frame[0], __fmul_rn(table[2 * index], frame[2]));
    *second = __fadd_rn(frame[1], __fmul_rn(table[2 * index + 1], frame[2]));
}

// The eight indices of one packed row of `bits` (<= 16) bytes.
__device__ __forceinline__ void cut_indices(const unsigned char* __restrict__ row, int bits, unsigned int* index) {
    unsigned long long low = 0, high = 0;  // the row's 8 * bits <= 128 bits
    for (int b = 0; b < bits; ++b) {
        const unsigned long long byte = row[b];
        if (b < 8) low |= byte << (8 * b);
        else high |= byte << (8 * (b - 8));
    }
    const unsigned int mask = (1u << bits) - 1u;
    for (int i = 0; i < INDICES_PER_ROW; ++i) {
        const int start = i * bits;
        unsigned long long window;
        if (start >= 64) window = high >> (start - 64);
        else if (start + bits <= 64) window = low >> start;
        else window = (low >> start) | (high << (64 - start));  // the index straddles the two halves
        index[i] = (unsigned int)window & mask;
    }
}

#define HYPER_ARGS                                                                                              \
    const float *__restrict__ x, const unsigned char *__restrict__ packed, const float *__restrict__ table,     \
        const float *__restrict__ frames, float *__restrict__ partial, int rows_x, int depth, int workers,     \
        int bits, int rows_per_frame, int rows_per_slice
#define HYPER_CALL x, packed, table, frames, partial, rows_x, depth, workers, bits, rows_per_frame, rows_per_slice

// The packed row's 8 indices and the frame of its group.
__device__ __forceinline__ const float* packed_row(const unsigned char* __restrict__ packed,
                                                   const float* __restrict__ frames, size_t row, int bits,
                                                   int rows_per_frame, unsigned int* index) {
    cut_indices(packed + row * bits, bits, index);
    return frames + 3 * (row / rows_per_frame);
}

// y = x @ W, W [depth, 16 * workers]: a thread owns 16 output columns (one packed row per weight row).
template <int TILE_M>
__device__ __forceinline__ void hyper_matmul_tile(HYPER_ARGS) {
    ThreadWork work;
    if (!thread_work(workers, TILE_M, depth, rows_per_slice, &work)) return;
    const int words = workers, word = work.worker, m0 = work.m0;
    const int columns = words * ELEMENTS_PER_ROW;

    float acc[TILE_M][ELEMENTS_PER_ROW];
    for (int m = 0; m < TILE_M; ++m)
        for (int j = 0; j < ELEMENTS_PER_ROW; ++j) acc[m][j] = 0.0f;

    unsigned int index[INDICES_PER_ROW];
    for (int r = work.begin; r < work.end; ++r) {
        const float* frame = packed_row(packed, frames, (size_t)r * words + word, bits, rows_per_frame, index);
        float xv[TILE_M];
        for (int m = 0; m < TILE_M; ++m) xv[m] = m0 + m < rows_x ? x[(size_t)(m0 + m) * depth + r] : 0.0f;
        for (int i = 0; i < INDICES_PER_ROW; ++i) {
            float first, second;
            decode_pair(table, frame, index[i], &first, &second);
            for (int m = 0; m < TILE_M; ++m) {
                acc[m][2 * i] += xv[m] * first;
                acc[m][2 * i + 1] += xv[m] * second;
            }
        }
    }
    for (int m = 0; m < TILE_M && m0 + m < rows_x; ++m) {
        float* out = partial + work.partial_row(m, rows_x) * columns + (size_t)word * ELEMENTS_PER_ROW;
        for (int j = 0; j < ELEMENTS_PER_ROW; ++j) out[j] = acc[m][j];
    }
}

// y = x @ W^T, W [workers, depth] (an embedding table read as the LM head, a Gemm with transB): a thread
// owns one output column, whose weights are one weight row, 16 at a time; rows_per_slice is a multiple of 16.
template <int TILE_M>
__device__ __forceinline__ void hyper_matmul_t_tile(HYPER_ARGS) {
    ThreadWork work;
    if (!thread_work(workers, TILE_M, depth, rows_per_slice, &work)) return;
    const int columns = workers, column = work.worker, m0 = work.m0;
    const int rows_per_weight_row = depth / ELEMENTS_PER_ROW;

    float acc[TILE_M];
    for (int m = 0; m < TILE_M; ++m) acc[m] = 0.0f;

    unsigned int index[INDICES_PER_ROW];
    for (int k = work.begin; k < work.end; k += ELEMENTS_PER_ROW) {
        const float* frame = packed_row(packed, frames, (size_t)column * rows_per_weight_row + k / ELEMENTS_PER_ROW,
                                        bits, rows_per_frame, index);
        for (int i = 0; i < INDICES_PER_ROW; ++i) {
            float first, second;
            decode_pair(table, frame, index[i], &first, &second);
            for (int m = 0; m < TILE_M && m0 + m < rows_x; ++m) {
                const float* xm = x + (size_t)(m0 + m) * depth + k + 2 * i;
                acc[m] += xm[0] * first + xm[1] * second;
            }
        }
    }
    for (int m = 0; m < TILE_M && m0 + m < rows_x; ++m)
        partial[work.partial_row(m, rows_x) * columns + column] = acc[m];
}

extern "C" __global__ void hyper_matmul_m1(HYPER_ARGS) { hyper_matmul_tile<1>(HYPER_CALL); }
extern "C" __global__ void hyper_matmul_m4(HYPER_ARGS) { hyper_matmul_tile<4>(HYPER_CALL); }
extern "C" __global__ void hyper_matmul_t_m1(HYPER_ARGS) { hyper_matmul_t_tile<1>(HYPER_CALL); }
extern "C" __global__ void hyper_matmul_t_m4(HYPER_ARGS) { hyper_matmul_t_tile<4>(HYPER_CALL); }
