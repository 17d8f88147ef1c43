//! The `qseed` binary: parse the command line, run it, turn the outcome into an exit code.

/// Every heap block is wiped when it is freed (1Password's zeroizing allocator around the
/// system's): the HTTP and TLS stacks keep received bytes — base64 entropy — in buffers qseed
/// cannot reach to wipe, and without this their freed copies would linger in the heap.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> =
    zeroizing_alloc::ZeroAlloc(std::alloc::System);

fn main() -> std::process::ExitCode {
    qseed::cli::main()
}
