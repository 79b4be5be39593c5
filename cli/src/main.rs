//! `cairn`: the administrator's command-line tool (see the library).

use std::process::ExitCode;

fn main() -> ExitCode {
    // Not locked for the whole run: `cairn up` writes its banner from a
    // server thread.
    cairn_cli::run(std::env::args_os(), &mut std::io::stdout())
}
