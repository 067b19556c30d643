//! Runs one vendor mock standalone, for benchmarks and manual checks:
//!
//! ```text
//! mock-upstream --vendor dify [--listen 127.0.0.1:0] [--api-key KEY]
//! ```
//!
//! Prints `listening on http://HOST:PORT` on stdout, then serves until killed. A dify
//! client's base URL is that address plus `/v1`.

use std::io::Write;
use std::process::ExitCode;

use upgate_e2e::mock::{MockUpstream, Vendor};

const USAGE: &str =
    "usage: mock-upstream --vendor dify|kore|maiagent|korexo|beam [--listen ADDR] [--api-key KEY]";

fn main() -> ExitCode {
    let mut vendor: Option<Vendor> = None;
    let mut listen = "127.0.0.1:0".to_owned();
    let mut api_key = "test-key".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        if name == "-h" || name == "--help" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        let Some(value) = inline.or_else(|| args.next()) else {
            eprintln!("{name} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        match name.as_str() {
            "--vendor" => match value.parse() {
                Ok(parsed) => vendor = Some(parsed),
                Err(problem) => {
                    eprintln!("{problem}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--listen" => listen = value,
            "--api-key" => api_key = value,
            _ => {
                eprintln!("unknown argument {name}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(vendor) = vendor else {
        eprintln!("--vendor is required\n{USAGE}");
        return ExitCode::from(2);
    };
    let mock = match MockUpstream::start_on(vendor, &api_key, listen.as_str()) {
        Ok(mock) => mock,
        Err(problem) => {
            eprintln!("cannot listen on {listen}: {problem}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "listening on {}", mock.origin());
    let _ = stdout.flush();
    drop(stdout);
    mock.wait();
    ExitCode::SUCCESS
}
