// y = x @ W for W[r, c] in hyperfunction codes: each pair (W[r, c], W[r, c + 1]), c even, is
// table[index] (float pairs, already c + L * u_j s_k), pair p = (r * N + c) / 2. Indices are a little-endian
// bit stream in rows of eight (`bits` bytes a row), so with N a multiple of 16 a row of indices is 16
// consecutive columns of one weight row. A thread owns those 16 columns and TILE_M rows of x over one slice
// of rows: it reads its `bits` bytes, cuts the eight indices in registers and gathers from the small table
// (read-only cache). Each slice writes partial[slice, m, c]; the caller adds the slices in a fixed order.
// No shared memory, shuffles or barriers: the source also compiles as host C++ (CPU emulation in tests).
#define TILE_M 4
#define COLUMNS_PER_ROW 16
#define INDICES_PER_ROW 8

extern "C" __global__ void hyper_matmul(const float* __restrict__ x, const unsigned char* __restrict__ packed,
                                        const float* __restrict__ table, float* __restrict__ partial,
                                        int rows_x, int depth, int words, int bits, int rows_per_slice) {
    const int word = blockIdx.x * blockDim.x + threadIdx.x;
    if (word >= words) return;
    const int slice = blockIdx.y;
    const int m0 = blockIdx.z * TILE_M;
    const int begin = slice * rows_per_slice;
    const int end = begin + rows_per_slice < depth ? begin + rows_per_slice : depth;
    const int columns = words * COLUMNS_PER_ROW;
    const unsigned int mask = (1u << bits) - 1u;

    float acc[TILE_M][COLUMNS_PER_ROW];
    for (int m = 0; m < TILE_M; ++m)
        for (int j = 0; j < COLUMNS_PER_ROW; ++j) acc[m][j] = 0.0f;

    for (int r = begin; r < end; ++r) {
        const unsigned char* row = packed + ((size_t)r * words + word) * bits;
        unsigned long long low = 0, high = 0;  // the row's 8 * bits <= 128 bits
        for (int b = 0; b < bits; ++b) {
            const unsigned long long byte = row[b];
            if (b < 8) low |= byte << (8 * b);
            else high |= byte << (8 * (b - 8));
        }
        float xv[TILE_M];
        for (int m = 0; m < TILE_M; ++m) xv[m] = m0 + m < rows_x ? x[(size_t)(m0 + m) * depth + r] : 0.0f;
        for (int i = 0; i < INDICES_PER_ROW; ++i) {
            const int start = i * bits;
            unsigned long long window;
            if (start >= 64) window = high >> (start - 64);
            else if (start + bits <= 64) window = low >> start;
            else window = (low >> start) | (high << (64 - start));  // the index straddles the two halves
            const unsigned int index = (unsigned int)window & mask;
            const float first = table[2 * index], second = table[2 * index + 1];
            for (int m = 0; m < TILE_M; ++m) {
                acc[m][2 * i] += xv[m] * first;
                acc[m][2 * i + 1] += xv[m] * second;
            }
        }
    }
    for (int m = 0; m < TILE_M && m0 + m < rows_x; ++m) {
        float* out = partial + ((size_t)slice * rows_x + m0 + m) * columns + (size_t)word * COLUMNS_PER_ROW;
        for (int j = 0; j < COLUMNS_PER_ROW; ++j) out[j] = acc[m][j];
    }
}
