// The work of one thread of the row-sliced matmul kernels (launch.py sets the grid): grid.x holds, for each
// tile of `tile` rows of x, the blocks across the workers (groups of output columns); grid.y the slices of
// the depth. A thread's worker, rows [m0, m0 + tile) of x and depth rows [begin, end) follow. The slice's
// partial result for row m of x starts at partial_row(m) * columns.
#pragma once

struct ThreadWork {
    int worker, slice, m0, begin, end;

    __device__ __forceinline__ size_t partial_row(int m, int rows_x) const { return (size_t)slice * rows_x + m0 + m; }
};

// False for the threads past the last worker (the block's tail), which have nothing to do.
__device__ __forceinline__ bool thread_work(int workers, int tile, int depth, int rows_per_slice, ThreadWork* work) {
    const unsigned int column_blocks = (workers + blockDim.x - 1) / blockDim.x;
    work->worker = (blockIdx.x % column_blocks) * blockDim.x + threadIdx.x;
    work->m0 = (blockIdx.x / column_blocks) * tile;
    work->slice = blockIdx.y;
    work->begin = work->slice * rows_per_slice;
    work->end = work->begin + rows_per_slice < depth ? work->begin + rows_per_slice : depth;
    return work->worker < workers;
}
