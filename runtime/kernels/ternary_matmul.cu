// y = x @ W for a ternary W[r, c] = (digit(r, c) - 1) * scales[r / block, c], digits in {0, 1, 2}.
// Codes: 2-bit digits, 16 per 32-bit word (digit j at bits 2j), `words` words a row (columns padded to 16
// with digit 1, i.e. t = 0). A thread owns 16 columns (one word a row) and TILE_M rows of x over one slice
// of rows: it unpacks each word in registers, sums x * t per scale block and folds the block's scale in at
// the block's end. Each slice writes its own partial[slice, m, c]; the caller adds the slices in a fixed
// order, so results do not depend on scheduling (no atomics). No shared memory, shuffles or barriers: the
// same source also compiles as host C++ for a CPU emulation of the grid (tests).
#define TILE_M 4
#define COLUMNS_PER_WORD 16

extern "C" __global__ void ternary_matmul(const float* __restrict__ x, const unsigned int* __restrict__ codes,
                                          const float* __restrict__ scales, float* __restrict__ partial,
                                          int rows_x, int depth, int words, int block, int rows_per_slice) {
    const int word = blockIdx.x * blockDim.x + threadIdx.x;
    if (word >= words) return;
    const int slice = blockIdx.y;
    const int m0 = blockIdx.z * TILE_M;
    const int begin = slice * rows_per_slice;
    const int end = begin + rows_per_slice < depth ? begin + rows_per_slice : depth;
    const int columns = words * COLUMNS_PER_WORD;

    float acc[TILE_M][COLUMNS_PER_WORD];
    float part[TILE_M][COLUMNS_PER_WORD];
    for (int m = 0; m < TILE_M; ++m)
        for (int j = 0; j < COLUMNS_PER_WORD; ++j) acc[m][j] = part[m][j] = 0.0f;

    for (int r = begin; r < end; ++r) {
        const unsigned int bits = codes[(size_t)r * words + word];
        float xv[TILE_M];
        for (int m = 0; m < TILE_M; ++m) xv[m] = m0 + m < rows_x ? x[(size_t)(m0 + m) * depth + r] : 0.0f;
        for (int j = 0; j < COLUMNS_PER_WORD; ++j) {
            const float t = (float)((bits >> (2 * j)) & 3u) - 1.0f;
            for (int m = 0; m < TILE_M; ++m) part[m][j] += xv[m] * t;
        }
        if ((r + 1) % block == 0 || r + 1 == end) {  // the scale block (or the slice) ends here
            const float* s = scales + (size_t)(r / block) * columns + (size_t)word * COLUMNS_PER_WORD;
            for (int j = 0; j < COLUMNS_PER_WORD; ++j) {
                const float sj = s[j];
                for (int m = 0; m < TILE_M; ++m) {
                    acc[m][j] += sj * part[m][j];
                    part[m][j] = 0.0f;
                }
            }
        }
    }
    for (int m = 0; m < TILE_M && m0 + m < rows_x; ++m) {
        float* out = partial + ((size_t)slice * rows_x + m0 + m) * columns + (size_t)word * COLUMNS_PER_WORD;
        for (int j = 0; j < COLUMNS_PER_WORD; ++j) out[j] = acc[m][j];
    }
}
