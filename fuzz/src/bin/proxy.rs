//! Fuzz target: bytes as a raw HTTP request to the embedded proxy, served in this process.
fn main() {
    vessel_fuzz::abort_on_panic();
    afl::fuzz!(|data: &[u8]| vessel_fuzz::proxy(data));
}
