//! `falcon-quantize`: see `falcon::quantize`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;

fn main() {
    let cli = falcon::quantize::Cli::parse();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // The first Ctrl-C asks the converter to stop and clean up; a second one exits at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    falcon::ignore_file_size_signal();
    if let Err(e) = falcon::quantize::run(cli, cancel.clone()) {
        eprintln!("falcon-quantize: error: {}", falcon::error_chain(&e));
        std::process::exit(if cancel.load(Ordering::SeqCst) {
            130
        } else {
            1
        });
    }
}
