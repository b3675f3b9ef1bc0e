//! Writes every target's seeds into `fuzz/corpus/<target>/seed-<n>`.
#![allow(clippy::expect_used)]

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (target, seeds) in herald_fuzz::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("the corpus directory");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("a seed file");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}
