/*
 * A stand-in inference engine for the CUDA probe's tests: it drives the fake libcuda.so.1 and
 * libcudart.so.12 through a fixed scenario and prints what it did as ground truth.
 *
 * Protocol (stdin/stdout, one line each):
 *   engine -> test   "ready <pid>"          (before any CUDA library is loaded)
 *   test -> engine   "go"                   (the probe is attached by now)
 *   engine -> test   one line of JSON       (the scenario's ground truth)
 *   test -> engine   "exit" (or EOF)        (the probe has read its ledger by now)
 *
 * Scenarios: full | bench <n> | idle.  The libraries are dlopened after "go" (found through
 * LD_LIBRARY_PATH); the binary links neither of them.
 *
 * Build: cc -O1 -g -fno-omit-frame-pointer -rdynamic -pthread -o fake_engine fake_engine.c -ldl
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct CUstream_st *CUstream;
typedef struct CUfunc_st *CUfunction;
typedef struct CUgraphExec_st *CUgraphExec;
typedef struct CUevent_st *CUevent;
typedef struct CUmemPoolHandle_st *CUmemoryPool;
typedef unsigned long long CUmemGenericAllocationHandle;
/* The real layout (CUDA 12), so a probe that reads it would find sane values. */
typedef struct CUlaunchConfig_st {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    void *attrs;
    unsigned int numAttrs;
} CUlaunchConfig;
/* Opaque to this program: a zeroed buffer at least as large as the real struct. */
typedef struct CUmemAllocationProp_st {
    unsigned char bytes[64];
} CUmemAllocationProp;

typedef int cudaError_t;
typedef struct CUstream_st *cudaStream_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;
typedef struct dim3 {
    unsigned int x, y, z;
} dim3;

#define KiB (1024ULL)
#define MiB (1024ULL * 1024ULL)

/* ---------------------------------------------------------------------------------------------- */
/* API ids and names: the same order as probe-common's `cuda::api::NAMES`.                        */

enum {
    CU_LAUNCH_KERNEL,
    CU_LAUNCH_KERNEL_PTSZ,
    CU_LAUNCH_KERNEL_EX,
    CU_LAUNCH_KERNEL_EX_PTSZ,
    CU_LAUNCH_COOPERATIVE_KERNEL,
    CU_LAUNCH_COOPERATIVE_KERNEL_PTSZ,
    CUDA_LAUNCH_KERNEL,
    CUDA_LAUNCH_KERNEL_PTSZ,
    CU_GRAPH_LAUNCH,
    CU_GRAPH_LAUNCH_PTSZ,
    CUDA_GRAPH_LAUNCH,
    CU_MEM_ALLOC,
    CU_MEM_ALLOC_PITCH,
    CU_MEM_ALLOC_MANAGED,
    CU_MEM_ALLOC_ASYNC,
    CU_MEM_ALLOC_ASYNC_PTSZ,
    CU_MEM_ALLOC_FROM_POOL_ASYNC,
    CU_MEM_ALLOC_FROM_POOL_ASYNC_PTSZ,
    CU_MEM_FREE,
    CU_MEM_FREE_ASYNC,
    CU_MEM_FREE_ASYNC_PTSZ,
    CU_MEM_ADDRESS_RESERVE,
    CU_MEM_ADDRESS_FREE,
    CU_MEM_CREATE,
    CU_MEM_RELEASE,
    CU_MEM_MAP,
    CU_MEM_UNMAP,
    CUDA_MALLOC,
    CUDA_MALLOC_ASYNC,
    CUDA_FREE,
    CUDA_FREE_ASYNC,
    CU_STREAM_SYNCHRONIZE,
    CU_STREAM_SYNCHRONIZE_PTSZ,
    CU_CTX_SYNCHRONIZE,
    CU_EVENT_SYNCHRONIZE,
    CUDA_STREAM_SYNCHRONIZE,
    CUDA_DEVICE_SYNCHRONIZE,
    API_COUNT
};

static const char *const NAMES[API_COUNT] = {
    "cuLaunchKernel",
    "cuLaunchKernel_ptsz",
    "cuLaunchKernelEx",
    "cuLaunchKernelEx_ptsz",
    "cuLaunchCooperativeKernel",
    "cuLaunchCooperativeKernel_ptsz",
    "cudaLaunchKernel",
    "cudaLaunchKernel_ptsz",
    "cuGraphLaunch",
    "cuGraphLaunch_ptsz",
    "cudaGraphLaunch",
    "cuMemAlloc_v2",
    "cuMemAllocPitch_v2",
    "cuMemAllocManaged",
    "cuMemAllocAsync",
    "cuMemAllocAsync_ptsz",
    "cuMemAllocFromPoolAsync",
    "cuMemAllocFromPoolAsync_ptsz",
    "cuMemFree_v2",
    "cuMemFreeAsync",
    "cuMemFreeAsync_ptsz",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemUnmap",
    "cudaMalloc",
    "cudaMallocAsync",
    "cudaFree",
    "cudaFreeAsync",
    "cuStreamSynchronize",
    "cuStreamSynchronize_ptsz",
    "cuCtxSynchronize",
    "cuEventSynchronize",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
};

static int is_kernel_launch(int id) { return id < CU_GRAPH_LAUNCH; }
static int is_graph_launch(int id) { return id >= CU_GRAPH_LAUNCH && id <= CUDA_GRAPH_LAUNCH; }
static int is_sync(int id) { return id >= CU_STREAM_SYNCHRONIZE; }
static int is_alloc(int id) {
    return (id >= CU_MEM_ALLOC && id <= CU_MEM_ALLOC_FROM_POOL_ASYNC_PTSZ) || id == CUDA_MALLOC ||
           id == CUDA_MALLOC_ASYNC;
}
static int is_free(int id) {
    return (id >= CU_MEM_FREE && id <= CU_MEM_FREE_ASYNC_PTSZ) || id == CUDA_FREE ||
           id == CUDA_FREE_ASYNC;
}

/* ---------------------------------------------------------------------------------------------- */
/* Entry points, resolved with dlsym after "go"                                                   */

static CUresult (*p_cuInit)(unsigned);
static CUresult (*p_cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                    unsigned, unsigned, CUstream, void **, void **);
static CUresult (*p_cuLaunchKernel_ptsz)(CUfunction, unsigned, unsigned, unsigned, unsigned,
                                         unsigned, unsigned, unsigned, CUstream, void **, void **);
static CUresult (*p_cuLaunchKernelEx)(const CUlaunchConfig *, CUfunction, void **, void **);
static CUresult (*p_cuLaunchKernelEx_ptsz)(const CUlaunchConfig *, CUfunction, void **, void **);
static CUresult (*p_cuLaunchCooperativeKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned,
                                               unsigned, unsigned, unsigned, CUstream, void **);
static CUresult (*p_cuLaunchCooperativeKernel_ptsz)(CUfunction, unsigned, unsigned, unsigned,
                                                    unsigned, unsigned, unsigned, unsigned,
                                                    CUstream, void **);
static CUresult (*p_cuGraphLaunch)(CUgraphExec, CUstream);
static CUresult (*p_cuGraphLaunch_ptsz)(CUgraphExec, CUstream);
static CUresult (*p_cuMemAlloc_v2)(CUdeviceptr *, size_t);
static CUresult (*p_cuMemAllocPitch_v2)(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
static CUresult (*p_cuMemAllocManaged)(CUdeviceptr *, size_t, unsigned);
static CUresult (*p_cuMemAllocAsync)(CUdeviceptr *, size_t, CUstream);
static CUresult (*p_cuMemAllocAsync_ptsz)(CUdeviceptr *, size_t, CUstream);
static CUresult (*p_cuMemAllocFromPoolAsync)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
static CUresult (*p_cuMemAllocFromPoolAsync_ptsz)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
static CUresult (*p_cuMemFree_v2)(CUdeviceptr);
static CUresult (*p_cuMemFreeAsync)(CUdeviceptr, CUstream);
static CUresult (*p_cuMemFreeAsync_ptsz)(CUdeviceptr, CUstream);
static CUresult (*p_cuMemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr,
                                         unsigned long long);
static CUresult (*p_cuMemAddressFree)(CUdeviceptr, size_t);
static CUresult (*p_cuMemCreate)(CUmemGenericAllocationHandle *, size_t,
                                 const CUmemAllocationProp *, unsigned long long);
static CUresult (*p_cuMemRelease)(CUmemGenericAllocationHandle);
static CUresult (*p_cuMemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                              unsigned long long);
static CUresult (*p_cuMemUnmap)(CUdeviceptr, size_t);
static CUresult (*p_cuStreamSynchronize)(CUstream);
static CUresult (*p_cuStreamSynchronize_ptsz)(CUstream);
static CUresult (*p_cuCtxSynchronize)(void);
static CUresult (*p_cuEventSynchronize)(CUevent);
static cudaError_t (*p_cudaLaunchKernel)(const void *, dim3, dim3, void **, size_t, cudaStream_t);
static cudaError_t (*p_cudaLaunchKernel_ptsz)(const void *, dim3, dim3, void **, size_t,
                                              cudaStream_t);
static cudaError_t (*p_cudaGraphLaunch)(cudaGraphExec_t, cudaStream_t);
static cudaError_t (*p_cudaMalloc)(void **, size_t);
static cudaError_t (*p_cudaMallocAsync)(void **, size_t, cudaStream_t);
static cudaError_t (*p_cudaFree)(void *);
static cudaError_t (*p_cudaFreeAsync)(void *, cudaStream_t);
static cudaError_t (*p_cudaStreamSynchronize)(cudaStream_t);
static cudaError_t (*p_cudaDeviceSynchronize)(void);

static char g_load_error[512];

static int load_libraries(void) {
    void *drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!drv) {
        snprintf(g_load_error, sizeof g_load_error, "dlopen libcuda.so.1: %s", dlerror());
        return -1;
    }
    void *rt = dlopen("libcudart.so.12", RTLD_NOW | RTLD_GLOBAL);
    if (!rt) {
        snprintf(g_load_error, sizeof g_load_error, "dlopen libcudart.so.12: %s", dlerror());
        return -1;
    }
#define SYM(h, name)                                                                               \
    do {                                                                                           \
        *(void **)&p_##name = dlsym(h, #name);                                                     \
        if (!p_##name) {                                                                           \
            snprintf(g_load_error, sizeof g_load_error, "dlsym %s: %s", #name, dlerror());         \
            return -1;                                                                             \
        }                                                                                          \
    } while (0)
    SYM(drv, cuInit);
    SYM(drv, cuLaunchKernel);
    SYM(drv, cuLaunchKernel_ptsz);
    SYM(drv, cuLaunchKernelEx);
    SYM(drv, cuLaunchKernelEx_ptsz);
    SYM(drv, cuLaunchCooperativeKernel);
    SYM(drv, cuLaunchCooperativeKernel_ptsz);
    SYM(drv, cuGraphLaunch);
    SYM(drv, cuGraphLaunch_ptsz);
    SYM(drv, cuMemAlloc_v2);
    SYM(drv, cuMemAllocPitch_v2);
    SYM(drv, cuMemAllocManaged);
    SYM(drv, cuMemAllocAsync);
    SYM(drv, cuMemAllocAsync_ptsz);
    SYM(drv, cuMemAllocFromPoolAsync);
    SYM(drv, cuMemAllocFromPoolAsync_ptsz);
    SYM(drv, cuMemFree_v2);
    SYM(drv, cuMemFreeAsync);
    SYM(drv, cuMemFreeAsync_ptsz);
    SYM(drv, cuMemAddressReserve);
    SYM(drv, cuMemAddressFree);
    SYM(drv, cuMemCreate);
    SYM(drv, cuMemRelease);
    SYM(drv, cuMemMap);
    SYM(drv, cuMemUnmap);
    SYM(drv, cuStreamSynchronize);
    SYM(drv, cuStreamSynchronize_ptsz);
    SYM(drv, cuCtxSynchronize);
    SYM(drv, cuEventSynchronize);
    SYM(rt, cudaLaunchKernel);
    SYM(rt, cudaLaunchKernel_ptsz);
    SYM(rt, cudaGraphLaunch);
    SYM(rt, cudaMalloc);
    SYM(rt, cudaMallocAsync);
    SYM(rt, cudaFree);
    SYM(rt, cudaFreeAsync);
    SYM(rt, cudaStreamSynchronize);
    SYM(rt, cudaDeviceSynchronize);
#undef SYM
    if (p_cuInit(0) != 0) {
        snprintf(g_load_error, sizeof g_load_error, "cuInit failed");
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Ground truth                                                                                   */

static unsigned long long g_calls[API_COUNT];
static unsigned long long g_unexpected;   /* calls whose result was not the expected one */
static unsigned long long g_double_frees; /* frees of a pointer already freed (rejected) */
static unsigned long long g_unknown_frees; /* frees of a pointer never allocated (rejected) */
static unsigned long long g_sync_ns;      /* wall time spent inside sync calls */

/* Counts one call of `id` and checks its result. Thread-safe. */
#define CALL(id, expect, expr)                                                                     \
    do {                                                                                           \
        __atomic_fetch_add(&g_calls[id], 1, __ATOMIC_RELAXED);                                     \
        int rc_ = (int)(expr);                                                                     \
        if (rc_ != (expect)) {                                                                     \
            __atomic_fetch_add(&g_unexpected, 1, __ATOMIC_RELAXED);                                \
            fprintf(stderr, "fake_engine: %s returned %d, expected %d (line %d)\n", NAMES[id],    \
                    rc_, (expect), __LINE__);                                                      \
        }                                                                                          \
    } while (0)

static unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

#define SYNC(id, expr)                                                                             \
    do {                                                                                           \
        unsigned long long t0_ = now_ns();                                                         \
        CALL(id, 0, expr);                                                                         \
        __atomic_fetch_add(&g_sync_ns, now_ns() - t0_, __ATOMIC_RELAXED);                          \
    } while (0)

/* The application's view of device memory: every successful allocation and whether it is live. */
struct block {
    unsigned long long addr, size;
    int live;
};
#define MAX_BLOCKS 8192
static struct block g_blocks[MAX_BLOCKS];
static int g_nblocks;
static pthread_mutex_t g_blocks_lock = PTHREAD_MUTEX_INITIALIZER;

static void note_alloc(unsigned long long addr, unsigned long long size) {
    pthread_mutex_lock(&g_blocks_lock);
    if (g_nblocks < MAX_BLOCKS) {
        g_blocks[g_nblocks++] = (struct block){addr, size, 1};
    } else {
        __atomic_fetch_add(&g_unexpected, 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&g_blocks_lock);
}

static void note_free(unsigned long long addr) {
    pthread_mutex_lock(&g_blocks_lock);
    int i;
    for (i = g_nblocks - 1; i >= 0; i--) {
        if (g_blocks[i].addr == addr && g_blocks[i].live) {
            g_blocks[i].live = 0;
            break;
        }
    }
    if (i < 0) {
        __atomic_fetch_add(&g_unexpected, 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&g_blocks_lock);
}

static unsigned long long live_block_bytes(void) {
    unsigned long long sum = 0;
    pthread_mutex_lock(&g_blocks_lock);
    for (int i = 0; i < g_nblocks; i++) {
        if (g_blocks[i].live) {
            sum += g_blocks[i].size;
        }
    }
    pthread_mutex_unlock(&g_blocks_lock);
    return sum;
}

/* Allocate with `id` through `expr` (which writes `*out`), and record the block. */
#define ALLOC(id, out, size, expr)                                                                 \
    do {                                                                                           \
        *(out) = 0;                                                                                \
        CALL(id, 0, expr);                                                                         \
        if (*(out)) {                                                                              \
            note_alloc((unsigned long long)*(out), (size));                                        \
        }                                                                                          \
    } while (0)

#define FREE(id, addr, expr)                                                                       \
    do {                                                                                           \
        CALL(id, 0, expr);                                                                         \
        note_free((unsigned long long)(addr));                                                     \
    } while (0)

/* ---------------------------------------------------------------------------------------------- */
/* Scenario `full`                                                                                */

static CUfunction const KERNEL = (CUfunction)0x5000;
static CUstream const STREAM = (CUstream)0x6000;
static CUgraphExec const GRAPH = (CUgraphExec)0x7000;
static CUevent const EVENT = (CUevent)0x8000;
static CUmemoryPool const POOL = (CUmemoryPool)0x9000;

static void *g_kernel_args[4];
static int g_arg_n = 42;
static float g_arg_x = 1.5f;

static void launch_one(void) {
    CALL(CU_LAUNCH_KERNEL, 0,
         p_cuLaunchKernel(KERNEL, 128, 1, 1, 256, 1, 1, 0, STREAM, g_kernel_args, NULL));
}

static void launch_one_rt(void) {
    dim3 grid = {64, 1, 1}, block = {128, 1, 1};
    CALL(CUDA_LAUNCH_KERNEL, 0,
         p_cudaLaunchKernel((const void *)KERNEL, grid, block, g_kernel_args, 0, STREAM));
}

/* a. Eager prefill: bursts of launches closed by a stream sync. */
static void prefill(void) {
    for (int burst = 0; burst < 3; burst++) {
        for (int i = 0; i < 200; i++) {
            launch_one();
        }
        for (int i = 0; i < 50; i++) {
            launch_one_rt();
        }
        SYNC(CU_STREAM_SYNCHRONIZE, p_cuStreamSynchronize(STREAM));
    }
}

/* b. Decode: one graph launch per step. */
static void decode(void) {
    for (int i = 0; i < 20; i++) {
        CALL(CU_GRAPH_LAUNCH, 0, p_cuGraphLaunch(GRAPH, STREAM));
        SYNC(CU_STREAM_SYNCHRONIZE, p_cuStreamSynchronize(STREAM));
    }
    for (int i = 0; i < 5; i++) {
        CALL(CUDA_GRAPH_LAUNCH, 0, p_cudaGraphLaunch(GRAPH, STREAM));
        SYNC(CUDA_STREAM_SYNCHRONIZE, p_cudaStreamSynchronize(STREAM));
    }
}

/* c. Every other launch and sync entry point once. */
static void variants(void) {
    CUlaunchConfig cfg = {.gridDimX = 32, .gridDimY = 1, .gridDimZ = 1, .blockDimX = 64,
                          .blockDimY = 1, .blockDimZ = 1, .sharedMemBytes = 0, .hStream = STREAM,
                          .attrs = NULL, .numAttrs = 0};
    dim3 grid = {8, 1, 1}, block = {32, 1, 1};
    CALL(CU_LAUNCH_KERNEL_PTSZ, 0,
         p_cuLaunchKernel_ptsz(KERNEL, 1, 1, 1, 32, 1, 1, 0, STREAM, g_kernel_args, NULL));
    CALL(CU_LAUNCH_KERNEL_EX, 0, p_cuLaunchKernelEx(&cfg, KERNEL, g_kernel_args, NULL));
    CALL(CU_LAUNCH_KERNEL_EX_PTSZ, 0, p_cuLaunchKernelEx_ptsz(&cfg, KERNEL, g_kernel_args, NULL));
    CALL(CU_LAUNCH_COOPERATIVE_KERNEL, 0,
         p_cuLaunchCooperativeKernel(KERNEL, 4, 1, 1, 64, 1, 1, 0, STREAM, g_kernel_args));
    CALL(CU_LAUNCH_COOPERATIVE_KERNEL_PTSZ, 0,
         p_cuLaunchCooperativeKernel_ptsz(KERNEL, 4, 1, 1, 64, 1, 1, 0, STREAM, g_kernel_args));
    CALL(CUDA_LAUNCH_KERNEL_PTSZ, 0,
         p_cudaLaunchKernel_ptsz((const void *)KERNEL, grid, block, g_kernel_args, 0, STREAM));
    CALL(CU_GRAPH_LAUNCH_PTSZ, 0, p_cuGraphLaunch_ptsz(GRAPH, STREAM));
    SYNC(CU_STREAM_SYNCHRONIZE_PTSZ, p_cuStreamSynchronize_ptsz(STREAM));
    SYNC(CU_CTX_SYNCHRONIZE, p_cuCtxSynchronize());
    SYNC(CU_EVENT_SYNCHRONIZE, p_cuEventSynchronize(EVENT));
    SYNC(CUDA_DEVICE_SYNCHRONIZE, p_cudaDeviceSynchronize());
}

/* d. Allocations that are all freed again. */
static void freed_pool(void) {
    static CUdeviceptr p[100];
    for (int i = 0; i < 100; i++) {
        ALLOC(CU_MEM_ALLOC, &p[i], 1 * MiB, p_cuMemAlloc_v2(&p[i], 1 * MiB));
    }
    for (int i = 0; i < 100; i++) {
        FREE(CU_MEM_FREE, p[i], p_cuMemFree_v2(p[i]));
    }
    for (int i = 0; i < 10; i++) {
        CUdeviceptr d;
        ALLOC(CU_MEM_ALLOC_ASYNC, &d, 64 * KiB, p_cuMemAllocAsync(&d, 64 * KiB, STREAM));
        FREE(CU_MEM_FREE_ASYNC, d, p_cuMemFreeAsync(d, STREAM));
    }
    for (int i = 0; i < 10; i++) {
        CUdeviceptr d;
        ALLOC(CU_MEM_ALLOC_ASYNC_PTSZ, &d, 64 * KiB, p_cuMemAllocAsync_ptsz(&d, 64 * KiB, STREAM));
        FREE(CU_MEM_FREE_ASYNC_PTSZ, d, p_cuMemFreeAsync_ptsz(d, STREAM));
    }
    for (int i = 0; i < 5; i++) {
        CUdeviceptr d;
        ALLOC(CU_MEM_ALLOC_FROM_POOL_ASYNC, &d, 128 * KiB,
              p_cuMemAllocFromPoolAsync(&d, 128 * KiB, POOL, STREAM));
        FREE(CU_MEM_FREE_ASYNC, d, p_cuMemFreeAsync(d, STREAM));
    }
    for (int i = 0; i < 5; i++) {
        CUdeviceptr d;
        ALLOC(CU_MEM_ALLOC_FROM_POOL_ASYNC_PTSZ, &d, 128 * KiB,
              p_cuMemAllocFromPoolAsync_ptsz(&d, 128 * KiB, POOL, STREAM));
        FREE(CU_MEM_FREE_ASYNC_PTSZ, d, p_cuMemFreeAsync_ptsz(d, STREAM));
    }
    for (int i = 0; i < 10; i++) {
        void *d;
        ALLOC(CUDA_MALLOC, &d, 256 * KiB, p_cudaMalloc(&d, 256 * KiB));
        FREE(CUDA_FREE, d, p_cudaFree(d));
    }
    for (int i = 0; i < 10; i++) {
        void *d;
        ALLOC(CUDA_MALLOC_ASYNC, &d, 32 * KiB, p_cudaMallocAsync(&d, 32 * KiB, STREAM));
        FREE(CUDA_FREE_ASYNC, d, p_cudaFreeAsync(d, STREAM));
    }
}

/* e. Allocations kept for the life of the process. */
static void kept_live(void) {
    CUdeviceptr pitched, managed;
    size_t pitch = 0;
    void *rt;
    /* The size recorded is pitch x height, as the driver allocates it. */
    CALL(CU_MEM_ALLOC_PITCH, 0, p_cuMemAllocPitch_v2(&pitched, &pitch, 1000, 10, 4));
    if (pitch != 1024) {
        __atomic_fetch_add(&g_unexpected, 1, __ATOMIC_RELAXED);
    }
    note_alloc(pitched, (unsigned long long)pitch * 10);
    ALLOC(CU_MEM_ALLOC_MANAGED, &managed, 3 * MiB, p_cuMemAllocManaged(&managed, 3 * MiB, 1));
    ALLOC(CUDA_MALLOC, &rt, 5 * MiB, p_cudaMalloc(&rt, 5 * MiB));
}

/* f. A leak with a recognisable caller chain: run_decode_loop -> leak_kv_scratch -> cuMemAlloc. */
#define LEAK_CALLS 8
#define LEAK_SIZE (4 * MiB)
static CUdeviceptr g_kv_scratch[LEAK_CALLS];

__attribute__((noinline, used, visibility("default"))) int leak_kv_scratch(int i) {
    CUdeviceptr d = 0;
    ALLOC(CU_MEM_ALLOC, &d, LEAK_SIZE, p_cuMemAlloc_v2(&d, LEAK_SIZE));
    /* Work after the call, so it is a real call (not a jump) and this frame is on the stack. */
    g_kv_scratch[i] = d;
    __asm__ volatile("" ::: "memory");
    return d != 0;
}

__attribute__((noinline, used, visibility("default"))) int run_decode_loop(void) {
    int ok = 0;
    for (int i = 0; i < LEAK_CALLS; i++) {
        if (i > 0) {
            struct timespec ts = {0, 50 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        ok += leak_kv_scratch(i);
        __asm__ volatile("" ::: "memory");
    }
    return ok;
}

/* g. Rejected frees. */
static void bad_frees(void) {
    CUdeviceptr d;
    ALLOC(CU_MEM_ALLOC, &d, 1 * MiB, p_cuMemAlloc_v2(&d, 1 * MiB));
    FREE(CU_MEM_FREE, d, p_cuMemFree_v2(d));
    CALL(CU_MEM_FREE, 1, p_cuMemFree_v2(d));
    g_double_frees++;
    CALL(CU_MEM_FREE, 1, p_cuMemFree_v2(0xdead0000ULL));
    g_unknown_frees++;
}

/* h. Virtual memory management: one reservation partly mapped, one reserved and freed. */
#define VMM_RESERVE (64 * MiB)
#define VMM_CHUNK (2 * MiB)
#define MAX_MAPS 8
static struct vmm_layout {
    unsigned long long reserved;
    unsigned long long mapped;
    unsigned long long free_bytes;
    unsigned long long holes;
    unsigned long long largest_free;
    unsigned long long created_live; /* bytes of physical handles still created */
} g_vmm;

struct range {
    unsigned long long off, size;
};

static int cmp_range(const void *a, const void *b) {
    const struct range *x = a, *y = b;
    return (x->off > y->off) - (x->off < y->off);
}

static void vmm(void) {
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    CUdeviceptr va = 0;
    CALL(CU_MEM_ADDRESS_RESERVE, 0, p_cuMemAddressReserve(&va, VMM_RESERVE, 0, 0, 0));
    CUmemGenericAllocationHandle h[4] = {0};
    for (int i = 0; i < 4; i++) {
        CALL(CU_MEM_CREATE, 0, p_cuMemCreate(&h[i], VMM_CHUNK, &prop, 0));
    }
    /* Offsets (MiB) of h0..h3 inside the reservation. */
    static const unsigned long long at[4] = {0, 2, 6, 10};
    struct range maps[MAX_MAPS];
    int nmaps = 0;
    for (int i = 0; i < 4; i++) {
        CALL(CU_MEM_MAP, 0, p_cuMemMap(va + at[i] * MiB, VMM_CHUNK, 0, h[i], 0));
        maps[nmaps++] = (struct range){at[i] * MiB, VMM_CHUNK};
    }
    /* Unmap and release h2 (at 6 MiB). */
    CALL(CU_MEM_UNMAP, 0, p_cuMemUnmap(va + 6 * MiB, VMM_CHUNK));
    for (int i = 0; i < nmaps; i++) {
        if (maps[i].off == 6 * MiB) {
            maps[i] = maps[--nmaps];
            break;
        }
    }
    CALL(CU_MEM_RELEASE, 0, p_cuMemRelease(h[2]));
    g_vmm.created_live = 3 * VMM_CHUNK;

    /* A second reservation, never mapped, given back. */
    CUdeviceptr va2 = 0;
    CALL(CU_MEM_ADDRESS_RESERVE, 0, p_cuMemAddressReserve(&va2, 8 * MiB, 0, 0, 0));
    CALL(CU_MEM_ADDRESS_FREE, 0, p_cuMemAddressFree(va2, 8 * MiB));

    /* The layout of what is left: the 64 MiB reservation and its mapped ranges. */
    qsort(maps, (size_t)nmaps, sizeof maps[0], cmp_range);
    g_vmm.reserved = VMM_RESERVE;
    unsigned long long cursor = 0;
    for (int i = 0; i <= nmaps; i++) {
        unsigned long long start = i < nmaps ? maps[i].off : VMM_RESERVE;
        if (start > cursor) {
            unsigned long long gap = start - cursor;
            g_vmm.holes++;
            g_vmm.free_bytes += gap;
            if (gap > g_vmm.largest_free) {
                g_vmm.largest_free = gap;
            }
        }
        if (i < nmaps) {
            g_vmm.mapped += maps[i].size;
            cursor = maps[i].off + maps[i].size;
        }
    }
}

/* i. Concurrent allocation from several threads. */
#define THREADS 4
#define PER_THREAD 250
static void *alloc_worker(void *arg) {
    (void)arg;
    CUdeviceptr p[PER_THREAD];
    for (int i = 0; i < PER_THREAD; i++) {
        ALLOC(CU_MEM_ALLOC, &p[i], 4 * KiB, p_cuMemAlloc_v2(&p[i], 4 * KiB));
    }
    for (int i = 0; i < PER_THREAD; i += 2) {
        FREE(CU_MEM_FREE, p[i], p_cuMemFree_v2(p[i]));
    }
    return NULL;
}

static void concurrency(void) {
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        if (pthread_create(&t[i], NULL, alloc_worker, NULL) != 0) {
            __atomic_fetch_add(&g_unexpected, 1, __ATOMIC_RELAXED);
            t[i] = 0;
        }
    }
    for (int i = 0; i < THREADS; i++) {
        if (t[i]) {
            pthread_join(t[i], NULL);
        }
    }
}

static long sync_us_env(void) {
    const char *s = getenv("FAKE_CUDA_SYNC_US");
    if (s && *s) {
        char *end = NULL;
        long v = strtol(s, &end, 10);
        if (end && *end == '\0' && v >= 0) {
            return v;
        }
    }
    return 2000;
}

static void print_full(void) {
    unsigned long long kernel = 0, graph = 0, syncs = 0, allocs = 0, frees = 0;
    printf("{\"pid\":%d,\"calls\":{", (int)getpid());
    int first = 1;
    for (int id = 0; id < API_COUNT; id++) {
        if (g_calls[id] == 0) {
            continue;
        }
        printf("%s\"%s\":%llu", first ? "" : ",", NAMES[id], g_calls[id]);
        first = 0;
        kernel += is_kernel_launch(id) ? g_calls[id] : 0;
        graph += is_graph_launch(id) ? g_calls[id] : 0;
        syncs += is_sync(id) ? g_calls[id] : 0;
        allocs += is_alloc(id) ? g_calls[id] : 0;
        frees += is_free(id) ? g_calls[id] : 0;
    }
    unsigned long long leak = 0;
    for (int i = 0; i < LEAK_CALLS; i++) {
        leak += g_kv_scratch[i] ? LEAK_SIZE : 0;
    }
    double ratio = g_vmm.free_bytes ? 1.0 - (double)g_vmm.largest_free / (double)g_vmm.free_bytes
                                    : 0.0;
    printf("},\"kernel_launches\":%llu,\"graph_launches\":%llu,\"syncs\":%llu,\"sync_us\":%ld,"
           "\"sync_ns_total\":%llu,\"allocs\":%llu,\"frees\":%llu,\"live_bytes\":%llu,"
           "\"leak_bytes\":%llu,\"leak_calls\":%d,\"leak_function\":\"leak_kv_scratch\","
           "\"leak_caller\":\"run_decode_loop\",\"double_frees\":%llu,\"unknown_frees\":%llu,"
           "\"unexpected_results\":%llu,"
           "\"vmm\":{\"reserved\":%llu,\"mapped\":%llu,\"created_live\":%llu,\"free_bytes\":%llu,"
           "\"holes\":%llu,\"largest_free_extent\":%llu,\"fragmentation_ratio\":%.17g}}\n",
           kernel, graph, syncs, sync_us_env(), g_sync_ns, allocs, frees,
           live_block_bytes() + g_vmm.created_live, leak, LEAK_CALLS, g_double_frees,
           g_unknown_frees, g_unexpected, g_vmm.reserved, g_vmm.mapped, g_vmm.created_live,
           g_vmm.free_bytes, g_vmm.holes, g_vmm.largest_free, ratio);
}

static void scenario_full(void) {
    g_kernel_args[0] = &g_arg_n;
    g_kernel_args[1] = &g_arg_x;
    prefill();
    decode();
    variants();
    freed_pool();
    kept_live();
    run_decode_loop();
    bad_frees();
    vmm();
    concurrency();
    print_full();
}

/* ---------------------------------------------------------------------------------------------- */
/* Scenario `bench <n>`: cost per call as the application sees it.                                */

static void scenario_bench(long n) {
    CUresult (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                       unsigned, CUstream, void **, void **) = p_cuLaunchKernel;
    CUresult (*alloc)(CUdeviceptr *, size_t) = p_cuMemAlloc_v2;
    CUresult (*release)(CUdeviceptr) = p_cuMemFree_v2;
    unsigned long long bad = 0;

    unsigned long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        bad += launch(KERNEL, 1, 1, 1, 32, 1, 1, 0, STREAM, g_kernel_args, NULL) != 0;
    }
    unsigned long long t1 = now_ns();
    for (long i = 0; i < n; i++) {
        CUdeviceptr d = 0;
        bad += alloc(&d, 4096) != 0;
        bad += release(d) != 0;
    }
    unsigned long long t2 = now_ns();
    printf("{\"launch_ns_per_call\":%.2f,\"alloc_free_ns_per_pair\":%.2f,\"n\":%ld,"
           "\"unexpected_results\":%llu}\n",
           (double)(t1 - t0) / (double)n, (double)(t2 - t1) / (double)n, n, bad);
}

/* ---------------------------------------------------------------------------------------------- */

/* Reads one line from stdin into `buf` (newline stripped); 0 at EOF. */
static int read_line(char *buf, size_t len) {
    if (!fgets(buf, (int)len, stdin)) {
        return 0;
    }
    buf[strcspn(buf, "\r\n")] = '\0';
    return 1;
}

static void json_error(const char *msg) {
    printf("{\"error\":\"");
    for (const char *c = msg; *c; c++) {
        if (*c == '"' || *c == '\\') {
            putchar('\\');
        }
        putchar((unsigned char)*c >= 0x20 ? *c : ' ');
    }
    printf("\"}\n");
}

/* ---------------------------------------------------------------------------------------------- */
/* Scenario `serve <port>`: an HTTP/1.1 SSE server on 127.0.0.1. Every POST is answered with one
 * eager prefill step (SERVE_PREFILL launches + a stream sync) before its first token, then
 * SERVE_DECODE decode steps (a graph launch + a sync), each followed by one token, then [DONE] and
 * close. The probe must call the first step of each request `prefill` and the others `decode`. */

enum { SERVE_PREFILL = 50, SERVE_DECODE = 5 };
static int g_listen_fd = -1;

static int write_all(int fd, const char *s) {
    size_t len = strlen(s);
    while (len > 0) {
        ssize_t n = write(fd, s, len);
        if (n <= 0) {
            return -1;
        }
        s += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads the request head and a Content-Length body (bounded: 16 KiB). */
static int read_request(int fd) {
    char buf[16384];
    size_t have = 0;
    char *end = NULL;
    while (!end) {
        if (have == sizeof buf - 1) {
            return -1;
        }
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n <= 0) {
            return -1;
        }
        have += (size_t)n;
        buf[have] = 0;
        end = strstr(buf, "\r\n\r\n");
    }
    size_t body = 0;
    for (char *p = buf; p < end; p++) {
        if (strncasecmp(p, "\ncontent-length:", 16) == 0) {
            body = (size_t)strtoul(p + 16, NULL, 10);
        }
    }
    size_t got = have - (size_t)(end + 4 - buf);
    while (got < body) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) {
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

static const char TOKEN[] = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok\"}}]}\n\n";

static void *serve_loop(void *arg) {
    (void)arg;
    for (;;) {
        int c = accept(g_listen_fd, NULL, NULL);
        if (c < 0) {
            continue;
        }
        if (read_request(c) == 0 &&
            write_all(c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         "Cache-Control: no-cache\r\nConnection: close\r\n\r\n") == 0) {
            for (int i = 0; i < SERVE_PREFILL; i++) {
                launch_one();
            }
            SYNC(CU_STREAM_SYNCHRONIZE, p_cuStreamSynchronize(STREAM));
            int ok = write_all(c, TOKEN) == 0;
            for (int s = 0; ok && s < SERVE_DECODE; s++) {
                CALL(CU_GRAPH_LAUNCH, 0, p_cuGraphLaunch(GRAPH, STREAM));
                SYNC(CU_STREAM_SYNCHRONIZE, p_cuStreamSynchronize(STREAM));
                ok = write_all(c, TOKEN) == 0;
            }
            if (ok) {
                write_all(c, "data: [DONE]\n\n");
            }
        }
        close(c);
    }
    return NULL;
}

static void scenario_serve(int port) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    pthread_t t;
    g_listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (g_listen_fd < 0 ||
        setsockopt(g_listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(g_listen_fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(g_listen_fd, 16) != 0 ||
        pthread_create(&t, NULL, serve_loop, NULL) != 0) {
        json_error("serve: cannot listen on the port");
        return;
    }
    printf("{\"port\":%d,\"prefill_launches\":%d,\"decode_steps_per_request\":%d}\n", port,
           SERVE_PREFILL, SERVE_DECODE);
}

static int usage(void) {
    fprintf(stderr, "usage: fake_engine full [pause_ms] | bench <n> | serve <port> | idle\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        return usage();
    }
    const char *scenario = argv[1];
    long bench_n = 0;
    long port = 0;
    if (strcmp(scenario, "bench") == 0) {
        if (argc < 3 || (bench_n = strtol(argv[2], NULL, 10)) <= 0) {
            return usage();
        }
    } else if (strcmp(scenario, "serve") == 0) {
        if (argc < 3 || (port = strtol(argv[2], NULL, 10)) <= 0 || port > 65535) {
            return usage();
        }
    } else if (strcmp(scenario, "full") != 0 && strcmp(scenario, "idle") != 0) {
        return usage();
    }
    /* `full <pause_ms>`: wait that long between loading the libraries and running the scenario
     * (lets a probe see the libraries mapped before the first call). */
    long pause_ms = 0;
    if (strcmp(scenario, "full") == 0 && argc >= 3) {
        pause_ms = strtol(argv[2], NULL, 10);
    }

    printf("ready %d\n", (int)getpid());
    fflush(stdout);

    char line[256];
    for (;;) {
        if (!read_line(line, sizeof line)) {
            return 0; /* EOF before "go": nothing to do */
        }
        if (strcmp(line, "go") == 0) {
            break;
        }
        if (strcmp(line, "exit") == 0) {
            return 0;
        }
    }

    if (load_libraries() != 0) {
        json_error(g_load_error);
    } else if (strcmp(scenario, "full") == 0) {
        if (pause_ms > 0) {
            struct timespec p = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
            nanosleep(&p, NULL);
        }
        scenario_full();
    } else if (strcmp(scenario, "bench") == 0) {
        scenario_bench(bench_n);
    } else if (strcmp(scenario, "serve") == 0) {
        scenario_serve((int)port);
    } else {
        printf("{}\n");
    }
    fflush(stdout);

    while (read_line(line, sizeof line)) {
        if (strcmp(line, "exit") == 0) {
            break;
        }
    }
    return 0;
}
