//! `falcon-quantize`: see `falcon::quantize`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;

fn main() {
    let cli = falcon::quantize::Cli::parse();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // The first Ctrl-C (or SIGTERM, SIGHUP) asks the converter to stop and clean up; a second
    // one removes the temporary files at once and exits.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            convert::partial::remove_all();
            eprintln!("falcon-quantize: error: interrupted; nothing was written");
            std::process::exit(130);
        }
        eprintln!("falcon-quantize: interrupted, cleaning up (interrupt again to stop at once)");
    });
    falcon::ignore_file_size_signal();
    if let Err(e) = falcon::quantize::run(cli, cancel.clone()) {
        if let Some(usage) = e.downcast_ref::<clap::Error>() {
            // Printed as clap prints its own, with status 2.
            let _ = usage.print();
            std::process::exit(usage.exit_code());
        }
        eprintln!("falcon-quantize: error: {}", falcon::error_chain(&e));
        std::process::exit(if cancel.load(Ordering::SeqCst) {
            130
        } else {
            1
        });
    }
}
