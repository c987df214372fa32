//! The conformance suite against both engines.

mod memory {
    use hubbub_history::MemoryEngine;

    hubbub_history::conformance_tests!(MemoryEngine::new);
}

mod disk {
    use hubbub_history::conformance::Guarded;
    use hubbub_history::{DiskConfig, DiskEngine, Options};
    use tempfile::TempDir;

    /// A disk engine on a fresh file in its own temporary directory.
    fn fresh(options: Options) -> Guarded<DiskEngine, TempDir> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = DiskConfig::new(dir.path().join("history.redb"));
        let engine = DiskEngine::open(config, options).expect("a new store opens");
        Guarded { engine, guard: dir }
    }

    hubbub_history::conformance_tests!(fresh);
}

mod disk_checkpointing {
    use std::time::Duration;

    use hubbub_history::conformance::Guarded;
    use hubbub_history::{DiskConfig, DiskEngine, Options};
    use tempfile::TempDir;

    /// A disk engine that checkpoints after every batch, so that reads merge the file with
    /// the journal's changes.
    fn fresh(options: Options) -> Guarded<DiskEngine, TempDir> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = DiskConfig {
            checkpoint_interval: Duration::ZERO,
            ..DiskConfig::new(dir.path().join("history.redb"))
        };
        let engine = DiskEngine::open(config, options).expect("a new store opens");
        Guarded { engine, guard: dir }
    }

    hubbub_history::conformance_tests!(fresh);
}
