//! Decoding of ring-buffer records into typed events. Pure: bytes in, `Event` out; lengths are
//! checked before any read and unknown kinds are reported, never panicked on (CONTRIBUTING.md,
//! "Hostile input").

use std::mem::size_of;

use probe_common::{
    ArrivalEvent, ConnEvent, CudaMemEvent, CudaSyncEvent, DataEvent, EventHeader, EventKind,
    ProcEvent, ThreadClock, DIR_EGRESS,
};

/// One decoded record. `payload` borrows the ring-buffer slot: it is parsed, never kept.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Data {
        header: EventHeader,
        fd: u32,
        egress: bool,
        ret: i64,
        syscall: u32,
        /// When the bytes reached the socket (0 = unknown; ingress only).
        arrival_ns: u64,
        /// The calling thread's clock at `header.ts_ns` (all zero: unknown).
        thread: ThreadClock,
        /// The first bytes moved (at most `MAX_CAPTURE`).
        payload: &'a [u8],
        /// The last bytes moved, of a write longer than the payload (`TAIL_CAPTURE`), or empty.
        /// They may overlap the payload when the write is shorter than both together.
        tail: &'a [u8],
        /// Plaintext of `SSL_read`/`SSL_write` (`EventKind::TlsData`): the `SSL *` it went
        /// through, and `fd` means nothing. `None`: bytes of a socket call.
        ssl: Option<u64>,
    },
    Accept {
        header: EventHeader,
        fd: u32,
    },
    Close {
        header: EventHeader,
        fd: u32,
    },
    Fork {
        header: EventHeader,
        child: u32,
    },
    Exit {
        header: EventHeader,
    },
    /// The parts of the next server read of this thread and fd that came in separate arrivals.
    Arrivals(ArrivalEvent),
    /// A CUDA memory call returned.
    CudaMem(CudaMemEvent),
    /// A CUDA synchronisation call returned.
    CudaSync(CudaSyncEvent),
    /// Bytes a traced process moved on a socket that is not one of its server's connections.
    Ipc {
        header: EventHeader,
        egress: bool,
        len: u32,
        /// The calling thread's clock at `header.ts_ns` (all zero: unknown).
        thread: ThreadClock,
        /// The first bytes moved (`EventKind::IpcData`): searched for request ids, never kept.
        payload: &'a [u8],
    },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("data record claims {claimed} payload bytes but carries {actual}")]
    BadLength { claimed: usize, actual: usize },
}

impl DecodeError {
    /// The `reason` label of `llm_probe_events_lost_total` for a record we could not use.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Short(_) | Self::BadLength { .. } => "malformed",
            Self::UnknownKind(_) => "unknown_kind",
        }
    }
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked above; `T` is one of probe-common's `repr(C)` integer-only records, so
    // every bit pattern is valid; `read_unaligned` makes no alignment assumption.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// A `DataEvent` and the head and tail bytes that follow it, their lengths checked.
fn data_parts(bytes: &[u8]) -> Result<(DataEvent, &[u8], &[u8]), DecodeError> {
    let d: DataEvent = read(bytes)?;
    let start = size_of::<DataEvent>();
    let claimed = d.cap_len as usize + usize::from(d.tail_len);
    let all = bytes
        .get(start..start + claimed)
        .ok_or(DecodeError::BadLength {
            claimed,
            actual: bytes.len() - start,
        })?;
    let (payload, tail) = all.split_at(d.cap_len as usize);
    Ok((d, payload, tail))
}

pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let header: EventHeader = read(bytes)?;
    match EventKind::from_u32(header.kind) {
        Some(kind @ (EventKind::Data | EventKind::TlsData)) => {
            let (d, payload, tail) = data_parts(bytes)?;
            Ok(Event::Data {
                header,
                fd: d.fd,
                egress: d.dir == DIR_EGRESS,
                ret: d.ret,
                syscall: u32::from(d.syscall),
                arrival_ns: d.arrival_ns,
                thread: d.thread,
                payload,
                tail,
                ssl: (kind == EventKind::TlsData).then_some(d.ssl),
            })
        }
        Some(EventKind::Accept) => {
            let c: ConnEvent = read(bytes)?;
            Ok(Event::Accept { header, fd: c.fd })
        }
        Some(EventKind::Close) => {
            let c: ConnEvent = read(bytes)?;
            Ok(Event::Close { header, fd: c.fd })
        }
        Some(EventKind::Fork) => {
            let p: ProcEvent = read(bytes)?;
            Ok(Event::Fork {
                header,
                child: p.other,
            })
        }
        Some(EventKind::Exit) => Ok(Event::Exit { header }),
        Some(EventKind::Arrivals) => Ok(Event::Arrivals(read(bytes)?)),
        Some(EventKind::CudaMem) => Ok(Event::CudaMem(read(bytes)?)),
        Some(EventKind::CudaSync) => Ok(Event::CudaSync(read(bytes)?)),
        Some(EventKind::IpcData) => {
            let (d, payload, _) = data_parts(bytes)?;
            Ok(Event::Ipc {
                header,
                egress: d.dir == DIR_EGRESS,
                len: u32::try_from(d.ret.max(0)).unwrap_or(u32::MAX),
                thread: d.thread,
                payload,
            })
        }
        None => Err(DecodeError::UnknownKind(header.kind)),
    }
}

/// Serialise a data record the way the kernel lays it out (tests and benchmarks replay these).
pub fn encode_data(
    header: EventHeader,
    fd: u32,
    egress: bool,
    ret: i64,
    payload: &[u8],
) -> Vec<u8> {
    encode_data_with_tail(header, fd, egress, ret, payload, &[])
}

/// [`encode_data`] with the kernel's tail capture of a long write after the payload.
pub fn encode_data_with_tail(
    header: EventHeader,
    fd: u32,
    egress: bool,
    ret: i64,
    payload: &[u8],
    tail: &[u8],
) -> Vec<u8> {
    let d = DataEvent {
        header: EventHeader {
            kind: EventKind::Data as u32,
            ..header
        },
        fd,
        dir: u32::from(egress),
        ret,
        cap_len: payload.len() as u32,
        syscall: if egress {
            probe_common::SYSCALL_WRITE as u16
        } else {
            probe_common::SYSCALL_READ as u16
        },
        tail_len: tail.len() as u16,
        arrival_ns: 0,
        thread: ThreadClock::default(),
        ssl: 0,
    };
    let mut out = Vec::with_capacity(size_of::<DataEvent>() + payload.len() + tail.len());
    // SAFETY: `DataEvent` is `repr(C)`, integer-only and padding-free (size pinned in probe-common).
    let raw = unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(&d).cast::<u8>(), size_of::<DataEvent>())
    };
    out.extend_from_slice(raw);
    out.extend_from_slice(payload);
    out.extend_from_slice(tail);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> EventHeader {
        EventHeader {
            kind: 0,
            tgid: 7,
            tid: 8,
            _pad: 0,
            ts_ns: 99,
        }
    }

    #[test]
    fn data_round_trip() {
        let raw = encode_data(hdr(), 5, true, 3, b"abc");
        let Ok(Event::Data {
            fd,
            egress,
            ret,
            payload,
            header,
            ..
        }) = decode(&raw)
        else {
            panic!("decode failed");
        };
        assert_eq!(
            (fd, egress, ret, payload, header.ts_ns),
            (5, true, 3, &b"abc"[..], 99)
        );
    }

    #[test]
    fn tls_plaintext_carries_its_ssl() {
        let mut raw = encode_data(hdr(), 0, false, 3, b"GET");
        raw[..4].copy_from_slice(&(EventKind::TlsData as u32).to_ne_bytes());
        let at = std::mem::offset_of!(DataEvent, ssl);
        raw[at..at + 8].copy_from_slice(&0xdead_b000_u64.to_ne_bytes());
        let Ok(Event::Data { ssl, payload, .. }) = decode(&raw) else {
            panic!("decode failed");
        };
        assert_eq!((ssl, payload), (Some(0xdead_b000), &b"GET"[..]));
        let Ok(Event::Data { ssl, .. }) = decode(&encode_data(hdr(), 5, true, 3, b"abc")) else {
            panic!("decode failed");
        };
        assert_eq!(ssl, None, "socket bytes have no SSL");
    }

    #[test]
    fn ipc_bytes_decode_as_ipc() {
        let mut raw = encode_data_with_tail(hdr(), 9, true, 5000, b"chatcmpl-1", b"tail");
        raw[..4].copy_from_slice(&(EventKind::IpcData as u32).to_ne_bytes());
        let Ok(Event::Ipc {
            egress,
            len,
            payload,
            header,
            ..
        }) = decode(&raw)
        else {
            panic!("decode failed");
        };
        assert_eq!(
            (egress, len, payload, header.tgid),
            (true, 5000, &b"chatcmpl-1"[..], 7),
            "the head only; the tail is not searched"
        );
        raw.truncate(raw.len() - 5);
        assert!(matches!(decode(&raw), Err(DecodeError::BadLength { .. })));
    }

    #[test]
    fn arrival_parts_decode_and_short_ones_do_not() {
        let ev = ArrivalEvent {
            header: EventHeader {
                kind: EventKind::Arrivals as u32,
                ..hdr()
            },
            fd: 5,
            n: 2,
            ends: [39, 120, 0, 0],
            ts_ns: [100, 140, 0, 0],
        };
        // SAFETY: `ArrivalEvent` is `repr(C)`, integer-only and padding-free (size pinned).
        let raw = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&ev).cast::<u8>(),
                size_of::<ArrivalEvent>(),
            )
        };
        assert_eq!(decode(raw), Ok(Event::Arrivals(ev)));
        assert_eq!(
            decode(&raw[..40]),
            Err(DecodeError::Short(40)),
            "a cut record is an error, not a guess"
        );
    }

    #[test]
    fn tail_follows_the_payload() {
        let raw = encode_data_with_tail(hdr(), 5, true, 9000, b"head", b"tail");
        let Ok(Event::Data { payload, tail, .. }) = decode(&raw) else {
            panic!("decode failed");
        };
        assert_eq!((payload, tail), (&b"head"[..], &b"tail"[..]));
        let mut lying = raw.clone();
        lying.truncate(raw.len() - 1);
        assert!(matches!(decode(&lying), Err(DecodeError::BadLength { .. })));
    }

    /// The kernel reserves a small record in place at a fixed size (`emit_small`: the header and
    /// 256 bytes of room); the bytes past `cap_len` are slack, never payload.
    #[test]
    fn a_record_reserved_in_place_has_slack_after_its_payload() {
        let mut raw = encode_data(hdr(), 5, true, 6, b"data: ");
        raw.resize(size_of::<DataEvent>() + 256, 0xAA);
        let Ok(Event::Data { payload, tail, .. }) = decode(&raw) else {
            panic!("decode failed");
        };
        assert_eq!((payload, tail), (&b"data: "[..], &b""[..]));
    }

    #[test]
    fn short_and_lying_records_are_errors() {
        assert_eq!(decode(&[0; 3]), Err(DecodeError::Short(3)));
        let mut raw = encode_data(hdr(), 5, false, 10, b"0123456789");
        raw.truncate(raw.len() - 4);
        assert!(matches!(
            decode(&raw),
            Err(DecodeError::BadLength {
                claimed: 10,
                actual: 6
            })
        ));
        let mut raw = encode_data(hdr(), 5, false, 1, b"x");
        raw[0] = 200;
        assert_eq!(decode(&raw), Err(DecodeError::UnknownKind(200)));
    }
}
