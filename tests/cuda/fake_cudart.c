/*
 * Stand-in for the CUDA runtime (libcudart.so.12), for tests on machines without a GPU.
 *
 * Exports the real runtime symbol names with the real C signatures. Each call goes to the
 * corresponding EXPORTED driver entry point, found with dlsym on dlopen("libcuda.so.1") (once,
 * on first use), the way a runtime's calls reach the driver: a probe on both libraries sees the
 * runtime call and then the driver call it makes, and must count the pair once.
 *
 * Build: cc -O2 -fno-omit-frame-pointer -fPIC -shared -Wl,-soname,libcudart.so.12 \
 *           -o libcudart.so.12 fake_cudart.c -ldl -pthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct CUstream_st *CUstream;
typedef struct CUfunc_st *CUfunction;
typedef struct CUgraphExec_st *CUgraphExec;

typedef int cudaError_t; /* CUresult values map 1:1 in this stand-in */
typedef struct CUstream_st *cudaStream_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;
typedef struct dim3 {
    unsigned int x, y, z;
} dim3;

#define cudaErrorInitializationError 3

#define API __attribute__((visibility("default"), noinline, used))

static CUresult (*p_cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                    unsigned, unsigned, CUstream, void **, void **);
static CUresult (*p_cuLaunchKernel_ptsz)(CUfunction, unsigned, unsigned, unsigned, unsigned,
                                         unsigned, unsigned, unsigned, CUstream, void **,
                                         void **);
static CUresult (*p_cuGraphLaunch)(CUgraphExec, CUstream);
static CUresult (*p_cuMemAlloc_v2)(CUdeviceptr *, size_t);
static CUresult (*p_cuMemAllocAsync)(CUdeviceptr *, size_t, CUstream);
static CUresult (*p_cuMemFree_v2)(CUdeviceptr);
static CUresult (*p_cuMemFreeAsync)(CUdeviceptr, CUstream);
static CUresult (*p_cuStreamSynchronize)(CUstream);
static CUresult (*p_cuCtxSynchronize)(void);

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_ready; /* written once inside pthread_once, read after it */

static void resolve(void) {
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        fprintf(stderr, "fake libcudart: dlopen(libcuda.so.1): %s\n", dlerror());
        return;
    }
#define SYM(name)                                                                                  \
    do {                                                                                           \
        *(void **)&p_##name = dlsym(h, #name);                                                     \
        if (!p_##name) {                                                                           \
            fprintf(stderr, "fake libcudart: dlsym(%s): %s\n", #name, dlerror());                  \
            return;                                                                                \
        }                                                                                          \
    } while (0)
    SYM(cuLaunchKernel);
    SYM(cuLaunchKernel_ptsz);
    SYM(cuGraphLaunch);
    SYM(cuMemAlloc_v2);
    SYM(cuMemAllocAsync);
    SYM(cuMemFree_v2);
    SYM(cuMemFreeAsync);
    SYM(cuStreamSynchronize);
    SYM(cuCtxSynchronize);
#undef SYM
    g_ready = 1;
}

static int driver(void) {
    pthread_once(&g_once, resolve);
    return g_ready;
}

API cudaError_t cudaLaunchKernel(const void *func, dim3 gridDim, dim3 blockDim, void **args,
                                 size_t sharedMem, cudaStream_t stream) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuLaunchKernel((CUfunction)func, gridDim.x, gridDim.y, gridDim.z, blockDim.x,
                            blockDim.y, blockDim.z, (unsigned)sharedMem, stream, args, NULL);
}

API cudaError_t cudaLaunchKernel_ptsz(const void *func, dim3 gridDim, dim3 blockDim, void **args,
                                      size_t sharedMem, cudaStream_t stream) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuLaunchKernel_ptsz((CUfunction)func, gridDim.x, gridDim.y, gridDim.z, blockDim.x,
                                 blockDim.y, blockDim.z, (unsigned)sharedMem, stream, args, NULL);
}

API cudaError_t cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuGraphLaunch(graphExec, stream);
}

API cudaError_t cudaMalloc(void **devPtr, size_t size) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuMemAlloc_v2((CUdeviceptr *)devPtr, size);
}

API cudaError_t cudaMallocAsync(void **devPtr, size_t size, cudaStream_t stream) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuMemAllocAsync((CUdeviceptr *)devPtr, size, stream);
}

API cudaError_t cudaFree(void *devPtr) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuMemFree_v2((CUdeviceptr)devPtr);
}

API cudaError_t cudaFreeAsync(void *devPtr, cudaStream_t stream) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuMemFreeAsync((CUdeviceptr)devPtr, stream);
}

API cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuStreamSynchronize(stream);
}

API cudaError_t cudaDeviceSynchronize(void) {
    if (!driver()) {
        return cudaErrorInitializationError;
    }
    return p_cuCtxSynchronize();
}
