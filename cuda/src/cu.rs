//! Counted access to cudarc's raw driver and NVRTC bindings, and the driver probe.
//!
//! Every CUDA call the workload makes goes through [`cu!`] (driver) or [`nvrtc!`] (NVRTC), which
//! bump a per-API counter *before* the call (failed calls count too) and turn the status code into
//! a [`CuError`]. Nothing here uses cudarc's safe layer (`CudaContext`, `CudaStream`, …), which
//! would make calls of its own (context checks, event bookkeeping, `cuCtxSynchronize` on drop).
//!
//! # Which exported symbol each call reaches
//!
//! cudarc 0.19 with `dynamic-loading` resolves each binding lazily, on its first use, with
//! `dlsym(handle, "<name of the binding>")` on the library `dlopen`ed from the candidate list
//! (`libcuda.so`, …, `libcuda.so.1`; for NVRTC `libnvrtc.so`, …, `libnvrtc.so.12`, …). The
//! binding name is passed verbatim, so the exported symbol reached is exactly the name the
//! workload calls — there is no `#define` remapping as in `cuda.h`, and no per-thread-stream
//! (`_ptsz`/`_ptds`) variant is ever chosen:
//!
//! | workload call | exported libcuda symbol |
//! |---|---|
//! | allocations / frees | `cuMemAlloc_v2`, `cuMemFree_v2` (not `cuMemAlloc`/`cuMemFree`) |
//! | stream-ordered pool | `cuMemAllocAsync`, `cuMemFreeAsync` (not `_ptsz`) |
//! | launches | `cuLaunchKernel` (not `cuLaunchKernel_ptsz`), `cuGraphLaunch` (not `_ptsz`) |
//! | syncs | `cuStreamSynchronize` (not `_ptsz`) |
//! | events | `cuEventCreate`, `cuEventRecord` (not `_ptsz`), `cuEventElapsedTime` (v1), `cuEventDestroy_v2` |
//! | capture | `cuStreamBeginCapture_v2`, `cuStreamEndCapture`, `cuGraphInstantiateWithFlags` (what `cuGraphInstantiate` is `#define`d to in CUDA 12 headers) |
//! | stream | `cuStreamCreate`, `cuStreamDestroy_v2` |
//! | context | `cuInit`, `cuDeviceGetCount`, `cuDeviceGet`, `cuDeviceGetName`, `cuDeviceGetAttribute`, `cuDevicePrimaryCtxRetain`, `cuCtxSetCurrent`, `cuDevicePrimaryCtxRelease_v2` |
//! | module | `cuModuleLoadData`, `cuModuleGetFunction`, `cuModuleUnload` |
//! | VMM | `cuMemGetAllocationGranularity`, `cuMemAddressReserve`, `cuMemCreate`, `cuMemMap`, `cuMemSetAccess`, `cuMemUnmap`, `cuMemRelease`, `cuMemAddressFree` |
//!
//! (The CUDA *runtime* — which this workload does not use — reaches the driver through
//! `cuGetProcAddress` instead, so a uprobe on these exported symbols sees this workload's calls but
//! not necessarily a runtime-based server's.)

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError};

use cudarc::driver::sys::CUresult;

/// The driver library the probe opens; the soname every CUDA driver install provides.
pub const LIBCUDA: &str = "libcuda.so.1";

static CALLS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts one call of `api`.
pub fn count(api: &'static str) {
    *CALLS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(api)
        .or_default() += 1;
}

/// Calls so far, per API name.
pub fn snapshot() -> BTreeMap<String, u64> {
    CALLS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect()
}

/// Calls of one API so far.
pub fn calls_of(api: &str) -> u64 {
    CALLS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(api)
        .copied()
        .unwrap_or(0)
}

/// A failed driver or NVRTC call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CuError {
    pub api: &'static str,
    pub code: String,
}

impl fmt::Display for CuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.api, self.code)
    }
}

impl std::error::Error for CuError {}

/// Turns a driver status into a result (the enum's name, e.g. `CUDA_ERROR_NO_DEVICE`, is the
/// message: no `cuGetErrorName` call, so no uncounted call either).
pub fn check(api: &'static str, r: CUresult) -> Result<(), CuError> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CuError {
            api,
            code: format!("{r:?}"),
        })
    }
}

/// Turns an NVRTC status into a result.
pub fn check_nvrtc(api: &'static str, r: cudarc::nvrtc::sys::nvrtcResult) -> Result<(), CuError> {
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CuError {
            api,
            code: format!("{r:?}"),
        })
    }
}

/// `cu!(cuName(args…))`: counts `cuName`, calls `cudarc::driver::sys::cuName(args…)` and returns
/// `Result<(), CuError>`. Must be used in an `unsafe` context: the arguments are raw pointers and
/// handles whose validity the caller vouches for.
macro_rules! cu {
    ($f:ident ( $($arg:expr),* $(,)? )) => {{
        $crate::cu::count(stringify!($f));
        $crate::cu::check(stringify!($f), cudarc::driver::sys::$f($($arg),*))
    }};
}

/// Like [`cu!`] for `cudarc::nvrtc::sys` functions.
macro_rules! nvrtc {
    ($f:ident ( $($arg:expr),* $(,)? )) => {{
        $crate::cu::count(stringify!($f));
        $crate::cu::check_nvrtc(stringify!($f), cudarc::nvrtc::sys::$f($($arg),*))
    }};
}

/// Why the workload cannot start.
#[derive(Debug)]
pub enum ProbeError {
    /// No usable driver: `libcuda.so.1` does not load, it is the toolkit's stub, or there is no
    /// device. The workload exits with code 2 and `no CUDA driver: <reason>`.
    NoDriver(String),
    /// A driver is there but refused to initialise (a real failure: exit code 1).
    Failed(CuError),
}

/// Checks that a driver and at least one device exist, before cudarc's loader (which panics when
/// no candidate library loads) is ever touched. Calls `cuInit(0)` and `cuDeviceGetCount` (counted).
pub fn probe_driver() -> Result<i32, ProbeError> {
    static LIB: OnceLock<libloading::Library> = OnceLock::new();
    if LIB.get().is_none() {
        // SAFETY: loading the driver runs its initialisers, which have no preconditions.
        let lib = unsafe { libloading::Library::new(LIBCUDA) }.map_err(|e| {
            ProbeError::NoDriver(format!("cannot load {LIBCUDA}: {}", error_chain(&e)))
        })?;
        // Kept open for the life of the process so cudarc's own dlopen finds it already mapped.
        let _ = LIB.set(lib);
    }
    // SAFETY: cuInit has no pointer arguments; the library is loaded (cudarc's candidate list
    // contains `libcuda.so.1`, so its loader cannot come up empty now).
    if let Err(e) = unsafe { cu!(cuInit(0)) } {
        return Err(match e.code.as_str() {
            "CUDA_ERROR_NO_DEVICE" | "CUDA_ERROR_STUB_LIBRARY" => {
                ProbeError::NoDriver(e.to_string())
            }
            _ => ProbeError::Failed(e),
        });
    }
    let mut n = 0i32;
    // SAFETY: out-pointer to a live local.
    unsafe { cu!(cuDeviceGetCount(&raw mut n)) }.map_err(ProbeError::Failed)?;
    if n <= 0 {
        return Err(ProbeError::NoDriver(format!(
            "cuDeviceGetCount returned {n} devices"
        )));
    }
    Ok(n)
}

/// `e: its source: …` (libloading's own message is just "dlopen failed"; dlerror is the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_accumulate_per_api() {
        let before = calls_of("cuTestOnly");
        count("cuTestOnly");
        count("cuTestOnly");
        assert_eq!(calls_of("cuTestOnly"), before + 2);
        assert_eq!(snapshot().get("cuTestOnly"), Some(&(before + 2)));
    }

    #[test]
    fn check_names_the_error() {
        assert!(check("cuInit", CUresult::CUDA_SUCCESS).is_ok());
        let e = check("cuInit", CUresult::CUDA_ERROR_NO_DEVICE).unwrap_err();
        assert_eq!(e.to_string(), "cuInit failed: CUDA_ERROR_NO_DEVICE");
    }
}
