//! Replays every fuzz corpus and regression input through its target on
//! the stable toolchain, so that what the fuzzers found (and every crash
//! fixed since) is checked by `cargo test`.
#![allow(clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Runs `f` on a thread with libFuzzer's main-thread stack (8 MiB, and
/// more for a debug build): the CEL parser recurses once per nesting level
/// up to its limit of 96, which a release build fits in 2 MiB but an
/// unoptimised one does not (see docs/fuzzing.md).
fn with_fuzzer_stack(f: fn()) {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(f)
        .expect("a replay thread")
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

#[test]
fn every_corpus_and_regression_input_replays_cleanly() {
    with_fuzzer_stack(replay_all);
}

fn replay_all() {
    let mut total = 0;
    for (target, run) in herald_fuzz::TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is missing or empty: the corpus is kept in the repository"
        );
        let regressions = files(&fuzz_dir().join("regressions").join(target));
        for path in corpus.iter().chain(&regressions) {
            let data = match std::fs::read(path) {
                Ok(d) => d,
                // A fuzzer running beside the test replaces reduced inputs.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => panic!("{}: {e}", path.display()),
            };
            // A panic names the input: replay it with the fuzz target.
            eprintln!("{target}: {}", path.display());
            run(&data);
            total += 1;
        }
    }
    assert!(total >= herald_fuzz::TARGETS.len());
}

#[test]
fn seeds_pass_their_targets() {
    with_fuzzer_stack(seeds);
}

fn seeds() {
    for (target, seeds) in herald_fuzz::seeds::all() {
        let run = herald_fuzz::TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, f)| *f)
            .unwrap_or_else(|| panic!("no target {target}"));
        assert!(!seeds.is_empty(), "{target} has no seeds");
        let before = herald_fuzz::accepted();
        for s in &seeds {
            run(s);
        }
        // Some seeds are refusals on purpose (an unsigned token, a CSR
        // asking to be a CA); the others reach the accepting path, where
        // the round trips and properties are asserted.
        let accepted = herald_fuzz::accepted() - before;
        eprintln!(
            "{target}: {} seeds reached {accepted} accepting paths",
            seeds.len()
        );
        assert!(
            accepted > 0,
            "no seed of {target} reaches its accepting path"
        );
    }
}
