//! A handler that does what its payload tells it to, good or bad. The runtime's sandbox
//! tests use it to show that a misbehaving handler is contained.
//!
//! | payload           | behaviour                                                  |
//! |-------------------|------------------------------------------------------------|
//! | `ok`              | replies `ok`                                               |
//! | `trap`            | executes `unreachable`                                     |
//! | `panic`           | panics                                                     |
//! | `loop`            | spins forever                                              |
//! | `alloc`           | allocates 1 MiB blocks until memory runs out               |
//! | `publish:SUBJECT` | publishes to SUBJECT and replies with what the host said   |
//! | `sleep:MS`        | sleeps MS milliseconds (a WASI sleep), then replies `slept` |
//! | `publish-then-reject:SUBJECT` | publishes to SUBJECT, then fails with `Error::Reject` |
//! | `retry`           | fails with `Error::Retry`                                  |
//! | `reject`          | fails with `Error::Reject`                                 |

use sluice_guest::{Error, Message, Result};

fn handle(msg: Message) -> Result {
    let command = msg.text()?.trim().to_owned();
    match command.as_str() {
        "ok" => sluice_guest::reply("ok")?,
        "trap" => trap(),
        "panic" => panic!("asked to panic"),
        "loop" => spin(),
        "alloc" => hog(),
        "retry" => return Err(Error::retry("asked to retry")),
        "reject" => return Err(Error::reject("asked to reject")),
        other if other.starts_with("sleep:") => {
            let ms: u64 = other["sleep:".len()..]
                .parse()
                .map_err(|_| Error::reject(format!("bad sleep command {other:?}")))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            sluice_guest::reply("slept")?;
        }
        other if other.starts_with("publish-then-reject:") => {
            sluice_guest::publish(&other["publish-then-reject:".len()..], "must not be sent")?;
            return Err(Error::reject("published, then rejected"));
        }
        other => match other.strip_prefix("publish:") {
            Some(subject) => {
                let answer = match sluice_guest::publish(subject, "from misbehave") {
                    Ok(()) => "published".to_owned(),
                    Err(e) => format!("refused: {e}"),
                };
                sluice_guest::reply(answer)?;
            }
            None => return Err(Error::reject(format!("unknown command {other:?}"))),
        },
    }
    Ok(())
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    unreachable!("trap");
}

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn hog() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        // Touch every page so the memory is really used, not just reserved.
        blocks.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&blocks);
    }
}

sluice_guest::handler!(handle);
