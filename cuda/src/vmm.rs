//! Virtual memory management: one reservation with mappings and a hole, kept until cleanup.
//!
//! Layout (slot = one allocation granularity): reserve [`SLOTS`] slots, create one physical
//! handle per slot in [`MAPPED_SLOTS`], map and enable access on each, then unmap [`UNMAPPED_SLOT`]
//! and release its handle. What stays mapped until cleanup: slots 0, 1 and 5.

use std::ptr;

use cudarc::driver::sys::{
    CUdevice, CUdeviceptr, CUmemAccessDesc, CUmemAccess_flags, CUmemAllocationGranularity_flags,
    CUmemAllocationHandleType, CUmemAllocationProp, CUmemAllocationProp_st__bindgen_ty_1,
    CUmemAllocationType, CUmemGenericAllocationHandle, CUmemLocation, CUmemLocationType,
};
use serde::Serialize;

use crate::cu::CuError;

/// Slots in the reservation.
pub const SLOTS: usize = 64;
/// Slots mapped (one physical handle each).
pub const MAPPED_SLOTS: [usize; 4] = [0, 1, 3, 5];
/// The mapped slot that is unmapped (and its handle released) again, leaving a hole.
pub const UNMAPPED_SLOT: usize = 3;

/// What the reservation looks like at the hold point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VmmSummary {
    pub granularity: u64,
    /// Reservation start (device virtual address).
    pub base: u64,
    /// Bytes reserved (`SLOTS` × granularity).
    pub reserved: u64,
    /// Bytes mapped to live physical handles.
    pub mapped: u64,
    /// Unmapped runs lying between two mapped slots.
    pub holes: u64,
    /// Largest unmapped run anywhere in the reservation, in bytes.
    pub largest_free_extent: u64,
}

/// `(holes, largest free run in slots)` of a slot map: holes are maximal unmapped runs with a
/// mapped slot on both sides; the largest run also counts the runs at either end.
pub fn layout(mapped: &[bool]) -> (u64, u64) {
    let (mut holes, mut largest, mut run) = (0u64, 0u64, 0u64);
    let mut seen_mapped = false;
    for &m in mapped {
        if m {
            if run > 0 && seen_mapped {
                holes += 1;
            }
            seen_mapped = true;
            run = 0;
        } else {
            run += 1;
            largest = largest.max(run);
        }
    }
    (holes, largest)
}

/// The live reservation.
pub struct Vmm {
    base: CUdeviceptr,
    granularity: usize,
    /// `(slot, handle)` for every handle still mapped.
    live: Vec<(usize, CUmemGenericAllocationHandle)>,
}

fn device_prop(dev: CUdevice) -> CUmemAllocationProp {
    CUmemAllocationProp {
        type_: CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: CUmemLocation {
            type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: dev,
        },
        win32HandleMetaData: ptr::null_mut(),
        allocFlags: CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

impl Vmm {
    /// Builds the layout described in the module docs. Calls: 1 × `cuMemGetAllocationGranularity`,
    /// 1 × `cuMemAddressReserve`, 4 × `cuMemCreate`, 4 × `cuMemMap`, 4 × `cuMemSetAccess`,
    /// 1 × `cuMemUnmap`, 1 × `cuMemRelease`.
    pub fn setup(dev: CUdevice) -> Result<Self, CuError> {
        let prop = device_prop(dev);
        let access = CUmemAccessDesc {
            location: prop.location,
            flags: CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        let mut granularity = 0usize;
        let mut base: CUdeviceptr = 0;
        // SAFETY: a context is current; pointers are to live locals; every address passed to
        // map/unmap/access lies inside the reservation and is granularity-aligned.
        unsafe {
            cu!(cuMemGetAllocationGranularity(
                &raw mut granularity,
                &raw const prop,
                CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            ))?;
            cu!(cuMemAddressReserve(
                &raw mut base,
                SLOTS * granularity,
                0,
                0,
                0
            ))?;
            let mut live = Vec::with_capacity(MAPPED_SLOTS.len());
            for slot in MAPPED_SLOTS {
                let mut handle: CUmemGenericAllocationHandle = 0;
                cu!(cuMemCreate(
                    &raw mut handle,
                    granularity,
                    &raw const prop,
                    0
                ))?;
                let at = base + (slot * granularity) as CUdeviceptr;
                cu!(cuMemMap(at, granularity, 0, handle, 0))?;
                cu!(cuMemSetAccess(at, granularity, &raw const access, 1))?;
                live.push((slot, handle));
            }
            let i = live
                .iter()
                .position(|(s, _)| *s == UNMAPPED_SLOT)
                .expect("UNMAPPED_SLOT is in MAPPED_SLOTS");
            let (slot, handle) = live.remove(i);
            cu!(cuMemUnmap(
                base + (slot * granularity) as CUdeviceptr,
                granularity
            ))?;
            cu!(cuMemRelease(handle))?;
            Ok(Self {
                base,
                granularity,
                live,
            })
        }
    }

    pub fn summary(&self) -> VmmSummary {
        let mut mapped = [false; SLOTS];
        for (slot, _) in &self.live {
            mapped[*slot] = true;
        }
        let (holes, largest) = layout(&mapped);
        let g = self.granularity as u64;
        VmmSummary {
            granularity: g,
            base: self.base,
            reserved: SLOTS as u64 * g,
            mapped: self.live.len() as u64 * g,
            holes,
            largest_free_extent: largest * g,
        }
    }

    /// Unmaps and releases what is left, then frees the reservation.
    pub fn cleanup(self) -> Result<(), CuError> {
        // SAFETY: the mappings and the reservation were made by `setup` and are freed once.
        unsafe {
            for (slot, handle) in self.live {
                cu!(cuMemUnmap(
                    self.base + (slot * self.granularity) as CUdeviceptr,
                    self.granularity
                ))?;
                cu!(cuMemRelease(handle))?;
            }
            cu!(cuMemAddressFree(self.base, SLOTS * self.granularity))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_layout_has_one_hole_and_a_tail() {
        let mut m = [false; SLOTS];
        for s in [0, 1, 5] {
            m[s] = true;
        }
        assert_eq!(layout(&m), (1, 58));
    }

    #[test]
    fn layout_edges() {
        assert_eq!(layout(&[]), (0, 0));
        assert_eq!(layout(&[false; 4]), (0, 4));
        assert_eq!(layout(&[true; 4]), (0, 0));
        assert_eq!(layout(&[false, true, false, false, true, false]), (1, 2));
        assert_eq!(layout(&[true, false, true, false, true]), (2, 1));
    }
}
