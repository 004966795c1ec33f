//! Empty library target: lets probe-user name this crate as a build dependency so cargo rebuilds
//! the kernel object when it changes (aya-template does the same).
#![no_std]
