//! The fuzzer's committed corpus, replayed through its targets' bodies (`fuzz/src/lib.rs`,
//! compiled here too, so the targets never drift from the crate's API): every input that
//! once found a bug, or seeds a target, must pass. The coverage-guided runs are `fuzz/run`.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

use crate::support::root;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = root().join("fuzz/corpus").join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir)
        .expect("the corpus is committed")
        .flatten()
    {
        let bytes = std::fs::read(e.path()).expect("read");
        run(&bytes);
        n += 1;
    }
    assert!(n > 0, "{target}: an empty corpus");
}

#[test]
fn the_load_corpus_replays_clean() {
    replay("load", targets::load);
}

#[test]
fn the_plan_corpus_replays_clean() {
    replay("plan", targets::plan);
}

#[test]
fn the_proxy_corpus_replays_clean() {
    replay("proxy", targets::proxy);
}
