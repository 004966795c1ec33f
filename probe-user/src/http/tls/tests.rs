use super::*;

const HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
const APP: &[u8] = &[0x17, 0x03, 0x03, 0x00, 0x20];

fn conn(fd: u32) -> ConnId {
    ConnId { tgid: 10, fd }
}

#[test]
fn tls_records_are_told_from_http() {
    assert!(looks_like_tls(HELLO));
    assert!(looks_like_tls(APP));
    assert!(!looks_like_tls(b"GET / HTTP/1.1\r\n"));
    assert!(!looks_like_tls(b"PRI * HTTP/2.0\r\n"));
    assert!(!looks_like_tls(&[0x16, 0x03]));
    assert!(!looks_like_tls(&[0x16, 0x02, 0x00]));
    assert!(!looks_like_tls(&[]));
}

#[test]
fn a_read_binds_the_ssl_to_the_connection_its_thread_read_last() {
    let mut j = TlsJoin::new();
    assert_eq!(
        j.on_socket(conn(5), 77, Some(HELLO), 100, true),
        Route::Cipher
    );
    assert_eq!(
        j.on_socket(conn(6), 78, Some(HELLO), 110, true),
        Route::Cipher
    );
    // The request's ciphertext, then its plaintext on the same thread.
    assert_eq!(
        j.on_socket(conn(5), 77, Some(APP), 200, true),
        Route::Cipher
    );
    // Dated by the request's ciphertext, not the handshake's.
    assert_eq!(
        j.on_plaintext(10, 77, 0xa000, false),
        Some((conn(5), Some(200)))
    );
    // The next request's arrival is its own.
    assert_eq!(
        j.on_socket(conn(5), 79, Some(APP), 500, true),
        Route::Cipher
    );
    // Writes and later reads follow the binding, whatever thread makes them.
    assert_eq!(j.on_plaintext(10, 99, 0xa000, true), Some((conn(5), None)));
    assert_eq!(
        j.on_plaintext(10, 79, 0xa000, false),
        Some((conn(5), Some(500)))
    );
    assert_eq!(
        j.on_plaintext(10, 78, 0xb000, false),
        Some((conn(6), Some(110)))
    );
    assert_eq!(j.counts.matched, 4);
    assert_eq!(j.counts.connections, 2);
}

#[test]
fn later_plaintext_of_one_ciphertext_read_is_dated_by_its_last_part() {
    let mut j = TlsJoin::new();
    j.on_socket(conn(5), 77, Some(HELLO), 100, true);
    // One read of records that came in two arrivals (an HTTP/2 client's preface and SETTINGS
    // at 200, its request at 230): `SSL_read` returns them one record at a time.
    j.on_socket(conn(5), 77, Some(APP), 200, true);
    j.last_arrival(conn(5), 230);
    let read = |j: &mut TlsJoin| j.on_plaintext(10, 77, 0xa000, false).map(|r| r.1);
    assert_eq!(read(&mut j), Some(Some(200)));
    assert_eq!(read(&mut j), Some(Some(230)));
    // Read later from what the library buffered: still those bytes' arrival.
    assert_eq!(read(&mut j), Some(Some(230)));
    // A read in one arrival: both are its time.
    j.on_socket(conn(5), 77, Some(APP), 300, true);
    assert_eq!(read(&mut j), Some(Some(300)));
    assert_eq!(read(&mut j), Some(Some(300)));
}

#[test]
fn plaintext_without_a_connection_is_counted_not_guessed() {
    let mut j = TlsJoin::new();
    // A write on an SSL never read from.
    assert_eq!(j.on_plaintext(10, 77, 0xa000, true), None);
    // A read by a thread that read no ciphertext.
    assert_eq!(j.on_plaintext(10, 77, 0xa000, false), None);
    // A read whose thread's last ciphertext belongs to another process.
    j.on_socket(ConnId { tgid: 11, fd: 5 }, 77, Some(HELLO), 1, true);
    assert_eq!(j.on_plaintext(10, 77, 0xa000, false), None);
    assert_eq!(j.counts.unmatched_writes, 1);
    assert_eq!(j.counts.unmatched_reads, 2);
    assert_eq!(j.counts.matched, 0);
}

#[test]
fn clear_text_and_writes_first_stay_plain() {
    let mut j = TlsJoin::new();
    assert_eq!(
        j.on_socket(conn(5), 1, Some(b"GET / HTTP/1.1\r\n"), 1, true),
        Route::Plain
    );
    // Only a read can start a TLS connection (a server does not speak first).
    assert_eq!(j.on_socket(conn(6), 1, None, 1, true), Route::Plain);
    assert!(!j.is_tls(conn(5)) && !j.is_tls(conn(6)));
}

#[test]
fn an_unreadable_process_is_reported_once_then_dropped() {
    let mut j = TlsJoin::new();
    assert_eq!(
        j.on_socket(conn(5), 1, Some(HELLO), 1, false),
        Route::Unreadable
    );
    assert_eq!(j.on_socket(conn(5), 1, Some(APP), 2, false), Route::Cipher);
    assert_eq!(j.on_plaintext(10, 1, 0xa000, false), None);
}

#[test]
fn a_close_frees_the_connection_and_a_reused_ssl_rebinds() {
    let mut j = TlsJoin::new();
    j.on_socket(conn(5), 1, Some(HELLO), 1, true);
    assert_eq!(
        j.on_plaintext(10, 1, 0xa000, false),
        Some((conn(5), Some(1)))
    );
    j.forget(conn(5));
    assert!(!j.is_tls(conn(5)));
    // OpenSSL hands the same address to the next connection.
    j.on_socket(conn(7), 1, Some(HELLO), 9, true);
    assert_eq!(j.on_plaintext(10, 1, 0xa000, true), None);
    assert_eq!(
        j.on_plaintext(10, 1, 0xa000, false),
        Some((conn(7), Some(9)))
    );
    assert_eq!(j.on_plaintext(10, 2, 0xa000, true), Some((conn(7), None)));
    j.forget_process(10);
    assert!(!j.is_tls(conn(7)));
    assert!(j.bound.is_empty() && j.last_read.is_empty());
}

#[test]
fn state_is_bounded() {
    let mut j = TlsJoin::new();
    for t in 0..(MAX_THREAD_HINTS as u32 + 10) {
        j.hint_for_test(t, conn(1));
    }
    assert!(j.last_read.len() <= MAX_THREAD_HINTS);
    for fd in 0..(MAX_TLS_CONNS as u32 + 5) {
        j.on_socket(conn(fd), 1, Some(HELLO), 1, true);
    }
    assert_eq!(j.conns.len(), MAX_TLS_CONNS);
    // Past the bound a connection is left to the HTTP parser (which counts it as not HTTP).
    assert_eq!(
        j.on_socket(conn(u32::MAX), 1, Some(HELLO), 1, true),
        Route::Plain
    );
}
