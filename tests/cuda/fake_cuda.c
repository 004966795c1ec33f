/*
 * Stand-in for the CUDA driver (libcuda.so.1), for tests on machines without a GPU.
 *
 * Exports the real driver symbol names with the real C signatures, so uprobes attached by symbol
 * read the same arguments they would on a real driver. Allocations hand out fake device addresses
 * from a bump allocator (nothing is ever backed by memory); frees are checked against a live set;
 * launches only bump a counter; synchronisation calls sleep FAKE_CUDA_SYNC_US microseconds
 * (read once at load, default 2000).
 *
 * Build: cc -O2 -fno-omit-frame-pointer -fPIC -shared -Wl,-soname,libcuda.so.1 \
 *           -o libcuda.so.1 fake_cuda.c -pthread
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct CUstream_st *CUstream;
typedef struct CUfunc_st *CUfunction;
typedef struct CUgraphExec_st *CUgraphExec;
typedef struct CUevent_st *CUevent;
typedef struct CUmemPoolHandle_st *CUmemoryPool;
typedef unsigned long long CUmemGenericAllocationHandle;
/* Opaque here: the fake never reads them. */
typedef struct CUlaunchConfig_st CUlaunchConfig;
typedef struct CUmemAllocationProp_st CUmemAllocationProp;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2

#define API __attribute__((visibility("default"), noinline, used))

/* ---------------------------------------------------------------------------------------------- */
/* Address space and live sets                                                                    */

#define HEAP_START 0x7f0000000000ULL
#define PLAIN_ALIGN 256ULL
#define VMM_GRANULE (2ULL << 20)

enum kind { K_ALLOC = 1, K_RESERVE = 2, K_HANDLE = 3 };

struct entry {
    uint64_t key; /* 0 = empty, TOMB = deleted */
    uint64_t size;
    uint32_t kind;
};
#define TOMB UINT64_MAX

struct table {
    struct entry *slots;
    size_t cap; /* power of two */
    size_t used; /* live entries */
    size_t tombs;
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t g_next_addr = HEAP_START;
static uint64_t g_next_handle = 1;
static struct table g_ptrs;    /* device pointers and reservations */
static struct table g_handles; /* physical allocation handles */

static size_t slot_of(uint64_t key, size_t cap) {
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 17) & (cap - 1);
}

/* Rebuilds `t` with room for its live entries plus one; 0 on success. */
static int table_grow(struct table *t) {
    size_t cap = t->cap ? t->cap : 1024;
    while ((t->used + 1) * 4 > cap) {
        cap *= 2;
    }
    struct entry *slots = calloc(cap, sizeof *slots);
    if (!slots) {
        return -1;
    }
    for (size_t i = 0; i < t->cap; i++) {
        struct entry e = t->slots[i];
        if (e.key == 0 || e.key == TOMB) {
            continue;
        }
        size_t j = slot_of(e.key, cap);
        while (slots[j].key != 0) {
            j = (j + 1) & (cap - 1);
        }
        slots[j] = e;
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    t->tombs = 0;
    return 0;
}

static int table_insert(struct table *t, uint64_t key, uint64_t size, uint32_t kind) {
    if ((t->used + t->tombs + 1) * 2 > t->cap && table_grow(t) != 0) {
        return -1;
    }
    size_t j = slot_of(key, t->cap);
    while (t->slots[j].key != 0 && t->slots[j].key != TOMB) {
        j = (j + 1) & (t->cap - 1);
    }
    if (t->slots[j].key == TOMB) {
        t->tombs--;
    }
    t->slots[j] = (struct entry){.key = key, .size = size, .kind = kind};
    t->used++;
    return 0;
}

static struct entry *table_find(struct table *t, uint64_t key) {
    if (t->cap == 0 || key == 0 || key == TOMB) {
        return NULL;
    }
    size_t j = slot_of(key, t->cap);
    while (t->slots[j].key != 0) {
        if (t->slots[j].key == key) {
            return &t->slots[j];
        }
        j = (j + 1) & (t->cap - 1);
    }
    return NULL;
}

static void table_remove(struct table *t, struct entry *e) {
    e->key = TOMB;
    t->used--;
    t->tombs++;
}

/* Hands out `size` bytes aligned to `align` and records them as `kind`; 0 when out of memory. */
static uint64_t bump(uint64_t size, uint64_t align, uint32_t kind) {
    pthread_mutex_lock(&g_lock);
    uint64_t addr = (g_next_addr + align - 1) & ~(align - 1);
    uint64_t span = (size + PLAIN_ALIGN - 1) & ~(PLAIN_ALIGN - 1);
    if (table_insert(&g_ptrs, addr, size, kind) != 0) {
        addr = 0;
    } else {
        g_next_addr = addr + span;
    }
    pthread_mutex_unlock(&g_lock);
    return addr;
}

/* Forgets a live `kind` entry at `addr` (and, when `size` is not 0, of that size). */
static CUresult release(struct table *t, uint64_t key, uint64_t size, uint32_t kind) {
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct entry *e = table_find(t, key);
    if (e && e->kind == kind && (size == 0 || e->size == size)) {
        table_remove(t, e);
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static CUresult alloc_plain(CUdeviceptr *dptr, size_t bytesize) {
    if (!dptr || bytesize == 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    uint64_t a = bump(bytesize, PLAIN_ALIGN, K_ALLOC);
    if (!a) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *dptr = a;
    return CUDA_SUCCESS;
}

static CUresult free_plain(CUdeviceptr dptr) {
    if (dptr == 0) {
        return CUDA_SUCCESS;
    }
    return release(&g_ptrs, dptr, 0, K_ALLOC);
}

/* ---------------------------------------------------------------------------------------------- */
/* Synchronisation                                                                                */

static long g_sync_us = 2000;

__attribute__((constructor)) static void fake_cuda_init(void) {
    const char *s = getenv("FAKE_CUDA_SYNC_US");
    if (s && *s) {
        char *end = NULL;
        long v = strtol(s, &end, 10);
        if (end && *end == '\0' && v >= 0) {
            g_sync_us = v;
        }
    }
}

static void sync_sleep(void) {
    if (g_sync_us <= 0) {
        return;
    }
    struct timespec ts = {.tv_sec = g_sync_us / 1000000, .tv_nsec = (g_sync_us % 1000000) * 1000};
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += ts.tv_sec;
    end.tv_nsec += ts.tv_nsec;
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec++;
        end.tv_nsec -= 1000000000L;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &end, NULL) == EINTR) {
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Exported API                                                                                   */

/* One counter per entry point (index: the probe's API id; 37 = cuInit), so no two bodies are
 * identical and none can be folded into another (two symbols at one address would fire one
 * uprobe twice). Relaxed atomics: entry points are called from many threads. */
static unsigned long long g_calls[38];
/* Out of line, so that every entry point is a non-leaf function and opens like the real driver's
 * (`endbr64; push %rbp` with -fcf-protection and frame pointers) instead of with a LOCK-prefixed
 * add, which x86 uprobes refuse. */
__attribute__((noinline)) static void hit(int i) {
    __atomic_fetch_add(&g_calls[i], 1, __ATOMIC_RELAXED);
}
#define HIT(i) hit(i)

API CUresult cuInit(unsigned int flags) {
    HIT(37);
    (void)flags;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                            unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                            unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                            void **kernelParams, void **extra) {
    HIT(0);
    (void)f, (void)gridDimX, (void)gridDimY, (void)gridDimZ, (void)blockDimX, (void)blockDimY;
    (void)blockDimZ, (void)sharedMemBytes, (void)hStream, (void)kernelParams, (void)extra;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                 unsigned int gridDimZ, unsigned int blockDimX,
                                 unsigned int blockDimY, unsigned int blockDimZ,
                                 unsigned int sharedMemBytes, CUstream hStream,
                                 void **kernelParams, void **extra) {
    HIT(1);
    (void)f, (void)gridDimX, (void)gridDimY, (void)gridDimZ, (void)blockDimX, (void)blockDimY;
    (void)blockDimZ, (void)sharedMemBytes, (void)hStream, (void)kernelParams, (void)extra;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams,
                              void **extra) {
    HIT(2);
    (void)config, (void)f, (void)kernelParams, (void)extra;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f,
                                   void **kernelParams, void **extra) {
    HIT(3);
    (void)config, (void)f, (void)kernelParams, (void)extra;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                       unsigned int gridDimZ, unsigned int blockDimX,
                                       unsigned int blockDimY, unsigned int blockDimZ,
                                       unsigned int sharedMemBytes, CUstream hStream,
                                       void **kernelParams) {
    HIT(4);
    (void)f, (void)gridDimX, (void)gridDimY, (void)gridDimZ, (void)blockDimX, (void)blockDimY;
    (void)blockDimZ, (void)sharedMemBytes, (void)hStream, (void)kernelParams;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                            unsigned int gridDimY, unsigned int gridDimZ,
                                            unsigned int blockDimX, unsigned int blockDimY,
                                            unsigned int blockDimZ, unsigned int sharedMemBytes,
                                            CUstream hStream, void **kernelParams) {
    HIT(5);
    (void)f, (void)gridDimX, (void)gridDimY, (void)gridDimZ, (void)blockDimX, (void)blockDimY;
    (void)blockDimZ, (void)sharedMemBytes, (void)hStream, (void)kernelParams;
    return CUDA_SUCCESS;
}

API CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream) {
    HIT(8);
    (void)hGraphExec, (void)hStream;
    return CUDA_SUCCESS;
}

API CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream) {
    HIT(9);
    (void)hGraphExec, (void)hStream;
    return CUDA_SUCCESS;
}

API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    HIT(11);
    return alloc_plain(dptr, bytesize);
}

API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t WidthInBytes,
                                size_t Height, unsigned int ElementSizeBytes) {
    HIT(12);
    if (!dptr || !pPitch || WidthInBytes == 0 || Height == 0 ||
        (ElementSizeBytes != 4 && ElementSizeBytes != 8 && ElementSizeBytes != 16)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    size_t pitch = (WidthInBytes + 511) & ~(size_t)511;
    CUresult rc = alloc_plain(dptr, pitch * Height);
    if (rc == CUDA_SUCCESS) {
        *pPitch = pitch;
    }
    return rc;
}

API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    HIT(13);
    (void)flags;
    return alloc_plain(dptr, bytesize);
}

API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream) {
    HIT(14);
    (void)hStream;
    return alloc_plain(dptr, bytesize);
}

API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream) {
    HIT(15);
    (void)hStream;
    return alloc_plain(dptr, bytesize);
}

API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                     CUstream hStream) {
    HIT(16);
    (void)pool, (void)hStream;
    return alloc_plain(dptr, bytesize);
}

API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                          CUstream hStream) {
    HIT(17);
    (void)pool, (void)hStream;
    return alloc_plain(dptr, bytesize);
}

API CUresult cuMemFree_v2(CUdeviceptr dptr) {
    HIT(18);
    return free_plain(dptr);
}

API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream) {
    HIT(19);
    (void)hStream;
    return free_plain(dptr);
}

API CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream) {
    HIT(20);
    (void)hStream;
    return free_plain(dptr);
}

API CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                 unsigned long long flags) {
    HIT(21);
    (void)addr, (void)flags;
    if (!ptr || size == 0 || size % VMM_GRANULE != 0 ||
        (alignment != 0 && (alignment & (alignment - 1)) != 0)) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    uint64_t align = alignment > VMM_GRANULE ? alignment : VMM_GRANULE;
    uint64_t a = bump(size, align, K_RESERVE);
    if (!a) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *ptr = a;
    return CUDA_SUCCESS;
}

API CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    HIT(22);
    return release(&g_ptrs, ptr, size, K_RESERVE);
}

API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                         const CUmemAllocationProp *prop, unsigned long long flags) {
    HIT(23);
    (void)flags;
    if (!handle || !prop || size == 0 || size % VMM_GRANULE != 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    CUresult rc = CUDA_SUCCESS;
    pthread_mutex_lock(&g_lock);
    uint64_t h = g_next_handle;
    if (table_insert(&g_handles, h, size, K_HANDLE) != 0) {
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        g_next_handle++;
        *handle = h;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

API CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    HIT(24);
    return release(&g_handles, handle, 0, K_HANDLE);
}

API CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,
                      CUmemGenericAllocationHandle handle, unsigned long long flags) {
    HIT(25);
    (void)flags;
    if (ptr == 0 || size == 0 || size % VMM_GRANULE != 0 || ptr % VMM_GRANULE != 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct entry *h = table_find(&g_handles, handle);
    if (h && offset + size <= h->size) {
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

API CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    HIT(26);
    if (ptr == 0 || size == 0 || size % VMM_GRANULE != 0 || ptr % VMM_GRANULE != 0) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

API CUresult cuStreamSynchronize(CUstream hStream) {
    HIT(31);
    (void)hStream;
    sync_sleep();
    return CUDA_SUCCESS;
}

API CUresult cuStreamSynchronize_ptsz(CUstream hStream) {
    HIT(32);
    (void)hStream;
    sync_sleep();
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize(void) {
    HIT(33);
    sync_sleep();
    return CUDA_SUCCESS;
}

API CUresult cuEventSynchronize(CUevent hEvent) {
    HIT(34);
    (void)hEvent;
    sync_sleep();
    return CUDA_SUCCESS;
}
