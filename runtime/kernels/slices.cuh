// The work of one thread of the row-sliced matmul kernels (launch.py sets the grid): worker blockIdx.x *
// blockDim.x + threadIdx.x (a group of output columns), rows [m0, m0 + TILE_M) of x (blockIdx.z), and the
// depth rows [begin, end) of slice blockIdx.y. The slice's partial result for row m of x starts at
// partial_row(m) * columns.
#pragma once

struct ThreadWork {
    int worker, slice, m0, begin, end;

    __device__ __forceinline__ size_t partial_row(int m, int rows_x) const { return (size_t)slice * rows_x + m0 + m; }
};

// False for the threads past the last worker (the block's tail), which have nothing to do.
__device__ __forceinline__ bool thread_work(int workers, int tile, int depth, int rows_per_slice, ThreadWork* work) {
    work->worker = blockIdx.x * blockDim.x + threadIdx.x;
    work->slice = blockIdx.y;
    work->m0 = blockIdx.z * tile;
    work->begin = work->slice * rows_per_slice;
    work->end = work->begin + rows_per_slice < depth ? work->begin + rows_per_slice : depth;
    return work->worker < workers;
}
