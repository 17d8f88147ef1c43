use std::sync::Mutex;

use super::*;

/// A source that serves OS randomness (or chosen bad blocks) and remembers everything.
#[derive(Default)]
struct FakeSource {
    served: Mutex<Vec<u8>>,
    requests: Mutex<Vec<usize>>,
    /// Blocks to serve instead of random ones, front first.
    scripted: Mutex<Vec<Vec<u8>>>,
    fail: std::sync::atomic::AtomicBool,
    /// Answers name an origin, `fake#N` for the Nth request, as a source set's do.
    origins: std::sync::atomic::AtomicBool,
}

impl EntropySource for Arc<FakeSource> {
    async fn fetch(&self, blocks: usize) -> Result<EntropyBytes, SourceError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(SourceError::Unavailable { retry_after: None });
        }
        self.requests.lock().unwrap().push(blocks);
        let mut out = EntropyBytes::zeroed(blocks * BLOCK_LEN);
        for i in 0..blocks {
            let block = &mut out.expose_mut()[i * BLOCK_LEN..(i + 1) * BLOCK_LEN];
            let scripted = {
                let mut s = self.scripted.lock().unwrap();
                (!s.is_empty()).then(|| s.remove(0))
            };
            match scripted {
                Some(bytes) => block.copy_from_slice(&bytes),
                None => getrandom::fill(block).unwrap(),
            }
        }
        self.served.lock().unwrap().extend_from_slice(out.expose());
        Ok(out)
    }

    async fn fetch_from(
        &self,
        blocks: usize,
    ) -> Result<(EntropyBytes, Option<String>), SourceError> {
        let bytes = self.fetch(blocks).await?;
        let origin = self
            .origins
            .load(Ordering::Relaxed)
            .then(|| format!("fake#{}", self.requests.lock().unwrap().len()));
        Ok((bytes, origin))
    }

    fn describe(&self) -> String {
        "fake".into()
    }
}

fn new_pool(config: PoolConfig) -> (Arc<FakeSource>, Arc<Pool<Arc<FakeSource>>>) {
    let source = Arc::new(FakeSource::default());
    (source.clone(), Arc::new(Pool::new(source, config)))
}

/// Every handed-out buffer sits at its own place in the served stream; sorted, they tile a
/// prefix of it without gap or overlap. Returns the bytes covered.
fn assert_tiles(taken: &[Vec<u8>], served: &[u8]) -> usize {
    let mut placed: Vec<(usize, usize)> = taken
        .iter()
        .map(|t| {
            let at = served
                .windows(t.len())
                .position(|w| w == &t[..])
                .expect("handed-out bytes come from the source");
            (at, t.len())
        })
        .collect();
    placed.sort();
    let mut end = 0;
    for (at, len) in placed {
        assert_eq!(at, end, "a gap or an overlap at byte {end}");
        end += len;
    }
    end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_takers_never_share_a_byte() {
    let (source, pool) = new_pool(PoolConfig::default());
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let size = 17 + t * 13;
            let id = pool.register(size, Duration::from_secs(1), Some(100));
            pool.seed_accepted(id);
            let mut got = Vec::new();
            for _ in 0..100 {
                let bytes = pool.take(id, size).await.unwrap();
                assert_eq!(bytes.len(), size, "exact sizes");
                got.push(bytes.expose().to_vec());
            }
            got
        }));
    }
    let mut taken = Vec::new();
    for task in tasks {
        taken.extend(task.await.unwrap());
    }
    let served = source.served.lock().unwrap().clone();
    let used = assert_tiles(&taken, &served);
    assert_eq!(used as u64, pool.stats().bytes_handed_out);
    assert!(
        served.len() - used < BLOCK_LEN,
        "bounded demand: under one block left over"
    );
}

#[tokio::test]
async fn a_bounded_run_buys_what_it_needs_in_few_requests() {
    let (source, pool) = new_pool(PoolConfig::default());
    let id = pool.register(48, Duration::from_millis(1), Some(10_000));
    pool.seed_accepted(id);
    for _ in 0..10_000 {
        pool.take(id, 48).await.unwrap();
    }
    let stats = pool.stats();
    assert_eq!(stats.bytes_handed_out, 480_000);
    // 480,000 bytes = 468.75 KiB: one request of 469 blocks.
    assert_eq!(*source.requests.lock().unwrap(), vec![469]);
    assert_eq!(stats.bytes_downloaded, 469 * 1024);
    assert_eq!(pool.drain(), 469 * 1024 - 480_000);
}

#[tokio::test]
async fn a_steady_service_buys_its_horizon_per_request() {
    let (source, pool) = new_pool(PoolConfig::default());
    // 48 bytes every 10 s = 4.8 B/s; a 10-minute horizon is 2,880 bytes: 3 KiB a request.
    let id = pool.register(48, Duration::from_secs(10), None);
    pool.seed_accepted(id);
    for _ in 0..200 {
        pool.take(id, 48).await.unwrap();
    }
    let requests = source.requests.lock().unwrap().clone();
    assert!(requests.iter().all(|&b| b == 3), "{requests:?}");
    // 9,600 bytes taken in 3 KiB requests: four requests.
    assert_eq!(requests.len(), 4);
}

#[tokio::test]
async fn requests_respect_max_bytes_and_max_age() {
    let config = PoolConfig {
        max_bytes: 64 * 1024,
        ..PoolConfig::default()
    };
    let (source, pool) = new_pool(config);
    let id = pool.register(4096, Duration::from_secs(1), None);
    pool.seed_accepted(id);
    pool.take(id, 4096).await.unwrap();
    assert_eq!(
        *source.requests.lock().unwrap(),
        vec![64],
        "capped at max_bytes"
    );

    let config = PoolConfig {
        max_age: Duration::from_secs(60),
        ..PoolConfig::default()
    };
    let (source, pool) = new_pool(config);
    // 100 B/s for at most 60 s: 6,000 bytes, 6 blocks, though the horizon asks for 60,000.
    let id = pool.register(100, Duration::from_secs(1), None);
    pool.seed_accepted(id);
    pool.take(id, 100).await.unwrap();
    assert_eq!(*source.requests.lock().unwrap(), vec![6]);
}

#[tokio::test(start_paused = true)]
async fn old_bytes_expire_and_are_counted() {
    let config = PoolConfig {
        max_age: Duration::from_secs(60),
        ..PoolConfig::default()
    };
    let (source, pool) = new_pool(config);
    let id = pool.register(48, Duration::from_secs(1), None);
    pool.seed_accepted(id);
    pool.take(id, 48).await.unwrap();
    let held = pool.stats().bytes_held;
    assert!(held > 0);
    tokio::time::advance(Duration::from_secs(61)).await;
    pool.take(id, 48).await.unwrap();
    let stats = pool.stats();
    assert_eq!(stats.bytes_expired, held);
    assert_eq!(source.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn the_background_refill_runs_ahead_of_need() {
    let (source, pool) = new_pool(PoolConfig {
        horizon: Duration::from_secs(5),
        ..PoolConfig::default()
    });
    let stop = CancellationToken::new();
    let refiller = {
        let pool = pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move { pool.refill_in_background(stop).await })
    };
    // 1 KiB/s: low water is one round plus 30 s of use; each request buys 5 s.
    let id = pool.register(1024, Duration::from_secs(1), None);
    pool.seed_accepted(id);
    for _ in 0..200 {
        pool.take(id, 1024).await.unwrap();
        tokio::task::yield_now().await;
        // Give the refiller its turn, as the period between rounds would.
        for _ in 0..50 {
            if pool.stats().bytes_held >= 1024 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stop.cancel();
    refiller.await.unwrap();
    let stats = pool.stats();
    assert_eq!(
        stats.takes_waited, 1,
        "only the very first take waited for the network"
    );
    assert!(source.requests.lock().unwrap().len() > 1);
}

#[tokio::test]
async fn unhealthy_blocks_are_dropped_and_never_handed_out() {
    let (source, pool) = new_pool(PoolConfig::default());
    let mut good = vec![0u8; BLOCK_LEN];
    getrandom::fill(&mut good).unwrap();
    *source.scripted.lock().unwrap() = vec![
        good.clone(),
        vec![0u8; BLOCK_LEN], // all zero
        good.clone(),         // replayed
    ];
    let id = pool.register(1024, Duration::from_secs(1), Some(3));
    pool.seed_accepted(id);
    let first = pool.take(id, 1024).await.unwrap();
    assert_eq!(first.expose(), &good[..]);
    let stats = pool.stats();
    assert_eq!(stats.blocks_rejected, 2);
    assert_eq!(stats.bytes_rejected, 2048);
    // The next take needs a new request: the bad blocks are gone.
    let second = pool.take(id, 1024).await.unwrap();
    assert_ne!(second.expose(), &good[..]);
    assert_ne!(second.expose(), &[0u8; BLOCK_LEN][..]);
    assert_eq!(source.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_failing_source_is_reported_and_nothing_is_handed_out() {
    let (source, pool) = new_pool(PoolConfig::default());
    source.fail.store(true, Ordering::Relaxed);
    let id = pool.register(48, Duration::from_secs(1), None);
    pool.seed_accepted(id);
    assert!(pool.take(id, 48).await.is_err());
    let stats = pool.stats();
    assert_eq!((stats.failed_requests, stats.bytes_handed_out), (1, 0));
}

/// Review: a target whose token could not be found still drove purchases (1 MiB bought in
/// 20 s while 96 bytes were used). Its demand stops counting once it fails to connect.
#[tokio::test]
async fn a_consumer_that_cannot_reach_its_token_drives_no_purchases() {
    let (source, pool) = new_pool(PoolConfig::default());
    let good = pool.register(48, Duration::from_secs(10), None);
    pool.seed_accepted(good);
    // 4 KiB a second, for a token that is not there.
    let lost = pool.register(4096, Duration::from_secs(1), None);
    pool.seed_accepted(lost);
    pool.set_reachable(lost, false);
    pool.take(good, 48).await.unwrap();
    // Sized for the good consumer alone: 4.8 B/s over 10 minutes, 3 KiB.
    assert_eq!(*source.requests.lock().unwrap(), vec![3]);
    // Back: it counts again.
    pool.set_reachable(lost, true);
    pool.take(lost, 4096).await.unwrap();
    assert_eq!(source.requests.lock().unwrap()[1], 512);
}

/// The first request waits for consumers that are due but have not yet tried their token, so
/// that it is sized for all of those that can be served, and only those.
#[tokio::test(start_paused = true)]
async fn the_first_request_waits_briefly_for_first_tries() {
    let (source, pool) = new_pool(PoolConfig::default());
    let good = pool.register(48, Duration::from_secs(10), None);
    pool.seed_accepted(good);
    let other = pool.register(48, Duration::from_secs(10), None);
    pool.seed_accepted(other);
    let lost = pool.register(4096, Duration::from_secs(1), None);
    pool.seed_accepted(lost);
    let later = pool.register_after(48, Duration::from_secs(10), None, Duration::from_secs(60));
    pool.seed_accepted(later);
    let taker = tokio::spawn({
        let pool = pool.clone();
        async move { pool.take(good, 48).await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        source.requests.lock().unwrap().is_empty(),
        "waiting for first tries"
    );
    pool.set_reachable(other, true);
    pool.set_reachable(lost, false);
    taker.await.unwrap().unwrap();
    // good + other (`later` is not due yet, `lost` failed): 2 × 4.8 B/s over 10 minutes.
    assert_eq!(*source.requests.lock().unwrap(), vec![6]);
    let _ = later;
}

#[tokio::test(start_paused = true)]
async fn a_consumer_that_never_answers_holds_the_first_request_one_second_at_most() {
    let (source, pool) = new_pool(PoolConfig::default());
    let good = pool.register(48, Duration::from_secs(10), None);
    pool.seed_accepted(good);
    let _silent = pool.register(48, Duration::from_secs(10), None);
    let started = Instant::now();
    pool.take(good, 48).await.unwrap();
    assert_eq!(started.elapsed(), SETTLE);
    assert_eq!(source.requests.lock().unwrap().len(), 1);
}

/// Issue 24: until a consumer's token has accepted a seed, only its next round is bought,
/// never its share of the horizon, so a token that refuses seeds costs at most its first
/// seed's block; once it accepts, its rate counts.
#[tokio::test]
async fn a_token_that_has_not_accepted_a_seed_costs_at_most_its_first_seed() {
    let (source, pool) = new_pool(PoolConfig::default());
    // 48 bytes every 10 s: a horizon of 3 KiB a request once it counts.
    let id = pool.register(48, Duration::from_secs(10), None);
    pool.take(id, 48).await.unwrap();
    assert_eq!(
        *source.requests.lock().unwrap(),
        vec![1],
        "one block, not the horizon"
    );
    pool.seed_accepted(id);
    for _ in 0..30 {
        pool.take(id, 48).await.unwrap();
    }
    let requests = source.requests.lock().unwrap().clone();
    assert!(requests[1..].iter().all(|&b| b == 3), "{requests:?}");
}

#[tokio::test]
async fn takes_name_the_requests_that_bought_them_with_their_origins() {
    let (source, pool) = new_pool(PoolConfig::default());
    source.origins.store(true, Ordering::Relaxed);
    // Until its token accepts a seed, a consumer's request buys one block (1,024 bytes).
    let id = pool.register(1000, Duration::from_secs(3600), None);
    let (_, first) = pool.take_traced(id, 1000).await.unwrap();
    assert_eq!(&*first, "r1@fake#1");
    let (_, across) = pool.take_traced(id, 1000).await.unwrap();
    assert_eq!(&*across, "r1@fake#1,r2@fake#2", "24 bytes of r1, then r2's");
    assert_eq!(*source.requests.lock().unwrap(), vec![1, 1]);
    // 48 bytes of r2 left: two takes from it share one text.
    let (_, a) = pool.try_take(id, 24).unwrap();
    let (_, b) = pool.try_take(id, 12).unwrap();
    assert_eq!(&*a, "r2@fake#2");
    assert!(Arc::ptr_eq(&a, &b), "formatted once per request");
    // The flush names the origin too.
    let (left, trace) = pool.take_leftover(100).unwrap();
    assert_eq!(left.len(), 12);
    assert_eq!(&*trace, "r2@fake#2");
    assert!(pool.take_leftover(100).is_none());
}

#[test]
fn a_trace_is_not_reused_for_another_request() {
    let mut traces = Traces::default();
    traces.note_origin(7, "a".into());
    traces.requests = vec![7];
    let seven = traces.of_take();
    traces.requests = vec![8];
    assert_eq!(&*traces.of_take(), "r8");
    traces.requests = vec![7];
    let again = traces.of_take();
    assert_eq!(&*again, "r7@a");
    assert!(
        !Arc::ptr_eq(&seven, &again),
        "the cache holds the last request only"
    );
}
