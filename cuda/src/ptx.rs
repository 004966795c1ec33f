//! The spin kernel: compiled with NVRTC when `libnvrtc` loads, else hand-written PTX.

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{self, AssertUnwindSafe};
use std::ptr;

use cudarc::driver::sys::{CUfunction, CUmodule};
use cudarc::nvrtc::sys::nvrtcProgram;

use crate::cu::CuError;

/// CUDA C source compiled by NVRTC: one thread busy-waits `cycles` SM clocks.
pub const SPIN_CU: &str = r#"
extern "C" __global__ void spin(unsigned long long cycles) {
    long long start = clock64();
    while ((unsigned long long)(clock64() - start) < cycles) {
    }
}
"#;

/// Hand-written equivalent of [`SPIN_CU`], for when NVRTC is missing or its PTX is too new for the
/// driver. PTX ISA 7.0 / `sm_50` is accepted by every driver since CUDA 11.0 and JIT-compiled to
/// the actual device (PTX is forward compatible).
pub const SPIN_PTX: &CStr = c"
.version 7.0
.target sm_50
.address_size 64

.visible .entry spin(
	.param .u64 spin_param_0
)
{
	.reg .pred 	%p<2>;
	.reg .b64 	%rd<5>;

	ld.param.u64 	%rd1, [spin_param_0];
	mov.u64 	%rd2, %clock64;
$L__spin_loop:
	mov.u64 	%rd3, %clock64;
	sub.s64 	%rd4, %rd3, %rd2;
	setp.lt.u64 	%p1, %rd4, %rd1;
	@%p1 bra 	$L__spin_loop;
	ret;
}
";

/// Kernel entry name (`extern "C"`, so unmangled in both sources).
pub const ENTRY: &CStr = c"spin";

/// Where the loaded kernel came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSource {
    Nvrtc,
    EmbeddedPtx,
}

impl KernelSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nvrtc => "nvrtc",
            Self::EmbeddedPtx => "embedded-ptx",
        }
    }
}

/// The loaded spin kernel.
pub struct Kernel {
    pub module: CUmodule,
    pub func: CUfunction,
    pub source: KernelSource,
    /// Why NVRTC was not used (`None` when it was).
    pub nvrtc_error: Option<String>,
    /// `major.minor` of the NVRTC library, when it loaded.
    pub nvrtc_version: Option<String>,
}

/// NVRTC's output: NUL-terminated PTX plus the library version.
struct Compiled {
    ptx: Vec<u8>,
    version: String,
}

/// Compiles [`SPIN_CU`] for `compute_<major><minor>`. Never panics: the library is probed first
/// (cudarc's loader panics when no candidate loads) and a missing symbol is caught.
fn nvrtc_compile(major: i32, minor: i32) -> Result<Compiled, String> {
    // SAFETY: only dlopens the candidate names (`libnvrtc.so`, …, `libnvrtc.so.12`, …).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc not found (cudarc tries libnvrtc.so, libnvrtc.so.12, libnvrtc.so.13, … on the loader path)".into());
    }
    let prev = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let out = panic::catch_unwind(AssertUnwindSafe(|| compile_inner(major, minor)));
    panic::set_hook(prev);
    match out {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".into());
            Err(format!("NVRTC loader: {msg}"))
        }
    }
}

fn compile_inner(major: i32, minor: i32) -> Result<Compiled, CuError> {
    let src = CString::new(SPIN_CU).expect("source has no NUL");
    let arch = CString::new(format!("--gpu-architecture=compute_{major}{minor}")).expect("no NUL");
    let opts = [arch.as_ptr()];
    let (mut maj, mut min) = (0i32, 0i32);
    let mut prog: nvrtcProgram = ptr::null_mut();
    // SAFETY: out-pointers to live locals; `src`, `opts` and the name outlive the calls; `prog`
    // is destroyed on every path after creation.
    unsafe {
        nvrtc!(nvrtcVersion(&raw mut maj, &raw mut min))?;
        nvrtc!(nvrtcCreateProgram(
            &raw mut prog,
            src.as_ptr(),
            c"spin.cu".as_ptr(),
            0,
            ptr::null(),
            ptr::null()
        ))?;
        let result = (|| {
            if let Err(e) = nvrtc!(nvrtcCompileProgram(prog, opts.len() as i32, opts.as_ptr())) {
                let mut n = 0usize;
                nvrtc!(nvrtcGetProgramLogSize(prog, &raw mut n))?;
                let mut log = vec![0u8; n.max(1)];
                nvrtc!(nvrtcGetProgramLog(prog, log.as_mut_ptr().cast::<c_char>()))?;
                let log = String::from_utf8_lossy(&log);
                return Err(CuError {
                    api: e.api,
                    code: format!("{} ({})", e.code, log.trim_end_matches('\0').trim()),
                });
            }
            let mut n = 0usize;
            nvrtc!(nvrtcGetPTXSize(prog, &raw mut n))?;
            let mut ptx = vec![0u8; n.max(1)];
            nvrtc!(nvrtcGetPTX(prog, ptx.as_mut_ptr().cast::<c_char>()))?;
            if ptx.last() != Some(&0) {
                ptx.push(0);
            }
            Ok(ptx)
        })();
        nvrtc!(nvrtcDestroyProgram(&raw mut prog))?;
        Ok(Compiled {
            ptx: result?,
            version: format!("{maj}.{min}"),
        })
    }
}

/// Loads NUL-terminated PTX and looks up [`ENTRY`].
fn load_module(image: *const c_void) -> Result<(CUmodule, CUfunction), CuError> {
    let mut module: CUmodule = ptr::null_mut();
    let mut func: CUfunction = ptr::null_mut();
    // SAFETY: a context is current; `image` points at NUL-terminated PTX that outlives the call;
    // out-pointers to live locals.
    unsafe {
        cu!(cuModuleLoadData(&raw mut module, image))?;
        cu!(cuModuleGetFunction(&raw mut func, module, ENTRY.as_ptr()))?;
    }
    Ok((module, func))
}

/// Compiles (NVRTC) or falls back to [`SPIN_PTX`], then loads the kernel into the current context.
pub fn load(major: i32, minor: i32, use_nvrtc: bool) -> Result<Kernel, CuError> {
    let mut nvrtc_version = None;
    let nvrtc_error = if use_nvrtc {
        match nvrtc_compile(major, minor) {
            Ok(c) => {
                nvrtc_version = Some(c.version);
                match load_module(c.ptx.as_ptr().cast()) {
                    Ok((module, func)) => {
                        return Ok(Kernel {
                            module,
                            func,
                            source: KernelSource::Nvrtc,
                            nvrtc_error: None,
                            nvrtc_version,
                        });
                    }
                    // Typically CUDA_ERROR_UNSUPPORTED_PTX_VERSION: NVRTC newer than the driver.
                    Err(e) => format!("NVRTC PTX did not load: {e}"),
                }
            }
            Err(e) => e,
        }
    } else {
        "disabled by --no-nvrtc".to_owned()
    };
    let (module, func) = load_module(SPIN_PTX.as_ptr().cast())?;
    Ok(Kernel {
        module,
        func,
        source: KernelSource::EmbeddedPtx,
        nvrtc_error: Some(nvrtc_error),
        nvrtc_version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_define_the_same_entry() {
        assert!(SPIN_CU.contains("extern \"C\" __global__ void spin(unsigned long long cycles)"));
        let ptx = SPIN_PTX.to_str().unwrap();
        assert!(ptx.contains(".visible .entry spin("));
        assert!(ptx.contains("%clock64"));
        assert_eq!(ENTRY.to_str().unwrap(), "spin");
    }

    #[test]
    fn source_names() {
        assert_eq!(KernelSource::Nvrtc.as_str(), "nvrtc");
        assert_eq!(KernelSource::EmbeddedPtx.as_str(), "embedded-ptx");
    }
}
