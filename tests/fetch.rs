//! `qseed fetch --output`: the file is replaced only when the fetch is complete, is 0600
//! whatever existed, and a link or a device at its path is refused. `--bytes` takes units.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use qseed::simulator::Fault;

const OLD: &[u8] = b"the old file's content\n";

fn world() -> World {
    let world = World::new();
    world.write_config(&world.source("entropy"));
    world
}

fn old_file(world: &World, name: &str) -> std::path::PathBuf {
    let path = world.path(name);
    std::fs::write(&path, OLD).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// Files in the world's folder whose name marks a fetch's temporary file.
fn leftovers(world: &World) -> Vec<String> {
    std::fs::read_dir(world.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".part"))
        .collect()
}

#[test]
fn a_complete_fetch_replaces_the_file_with_mode_0600() {
    let world = world();
    let out = old_file(&world, "seed.bin");
    let run = world.run(&["fetch", "--bytes", "2K", "--output", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", stderr(&run));
    let written = std::fs::read(&out).unwrap();
    assert_eq!(written.len(), 2048, "2K is 2,048 bytes");
    assert_eq!(
        written,
        world.sim.served()[..2048],
        "the served bytes, in order"
    );
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "0600 although the old file was 0644");
    assert!(leftovers(&world).is_empty());
}

#[test]
fn a_failed_fetch_leaves_the_old_file_as_it_was() {
    let world = world();
    let out = old_file(&world, "seed.bin");
    world.set_fault(Fault::Status(500));
    let run = world.run(&[
        "fetch",
        "--bytes",
        "4MiB",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    assert_eq!(std::fs::read(&out).unwrap(), OLD);
    assert!(leftovers(&world).is_empty(), "{:?}", leftovers(&world));
}

#[test]
fn a_fetch_interrupted_mid_way_leaves_the_old_file_and_no_temporary_file() {
    let world = world();
    let out = old_file(&world, "seed.bin");
    world.set_fault(Fault::Slow(Duration::from_secs(30)));
    let child = world
        .qseed()
        .args([
            "fetch",
            "--bytes",
            "1MiB",
            "--output",
            out.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The temporary file beside the output exists while the answer is awaited.
    assert!(
        wait_until(Duration::from_secs(5), || !leftovers(&world).is_empty()),
        "a temporary file beside --output"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let run = child.wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr(&run).contains("interrupted; "), "{}", stderr(&run));
    assert_eq!(std::fs::read(&out).unwrap(), OLD);
    assert!(leftovers(&world).is_empty(), "{:?}", leftovers(&world));
}

#[test]
fn a_link_or_a_device_at_the_output_path_is_refused() {
    let world = world();
    let real = old_file(&world, "real.bin");
    let link = world.path("link.bin");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let run = world.run(&["fetch", "--bytes", "48", "--output", link.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    assert!(
        stderr(&run).contains("is a symbolic link"),
        "{}",
        stderr(&run)
    );
    assert_eq!(
        std::fs::read(&real).unwrap(),
        OLD,
        "the link's target is untouched"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());

    let run = world.run(&["fetch", "--bytes", "48", "--output", "/dev/null"]);
    assert_eq!(run.status.code(), Some(2));
    assert!(
        stderr(&run).contains("is a character device, not a regular file"),
        "{}",
        stderr(&run)
    );
    assert_eq!(world.sim.requests(), 0, "nothing was bought");
}

#[test]
fn bytes_take_units_and_bad_counts_are_usage_errors() {
    let world = world();
    let run = world
        .qseed()
        .args(["fetch", "--bytes", "1KiB"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(run.stdout.len(), 1024);
    for (bad, says) in [
        ("1.5K", "not a byte count"),
        ("0", "out of range"),
        ("2G", "out of range"),
    ] {
        let run = world.run(&["fetch", "--bytes", bad]);
        assert_eq!(run.status.code(), Some(2), "{bad}");
        assert!(stderr(&run).contains(says), "{bad}: {}", stderr(&run));
    }
}
