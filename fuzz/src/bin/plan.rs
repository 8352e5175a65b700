//! Fuzz target: bytes as a desired tree and an observed snapshot, planned; the safety
//! invariants are checked on the plan.
fn main() {
    vessel_fuzz::abort_on_panic();
    afl::fuzz!(|data: &[u8]| vessel_fuzz::plan(data));
}
