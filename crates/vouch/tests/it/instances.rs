//! Two `vouch serve` instances on one PostgreSQL: a terminal uploading the same
//! payments to both at once, in batches that overlap, settles each payment once.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use crate::serve::{ServeProcess, postgres_schema};
use crate::settlement::{BATCH_PAYMENTS, OfflineShop, UNLIMITED, assert_settled_once, batches, by_payment, upload};

/// The instances of one database share its master key.
const MASTER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const PAYMENTS: usize = 1_000;

#[test]
fn overlapping_batches_on_two_instances_settle_each_payment_once() {
    let Some(url) = postgres_schema() else { return };
    let env: Vec<(&str, &str)> = UNLIMITED.into_iter().chain([("VOUCH_MASTER_KEY", MASTER_KEY)]).collect();
    let instances = [ServeProcess::start_with(Some(&url), &env), ServeProcess::start_with(Some(&url), &env)];
    // Only the instance that bootstrapped the database wrote the admin key.
    let admin_key = instances.iter().map(|s| s.admin_key.clone()).find(|key| !key.is_empty()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let shop = runtime.block_on(OfflineShop::set_up(&instances[0].url, &admin_key, 2_000, 1_500));
    let payments = shop.payments(PAYMENTS);
    // The second instance's batches start half a batch later: each overlaps two of the
    // first's, and both instances work through them at the same time.
    let shifted = payments.iter().cycle().skip(BATCH_PAYMENTS / 2).take(PAYMENTS);
    let uploads = [batches(payments.iter().map(|(_, p)| p)), batches(shifted.map(|(_, p)| p))];
    let key = &shop.terminal_api_key;
    let [on_first, on_second] = runtime.block_on(async {
        let [first, second] = uploads.map(Arc::new);
        let answered = Arc::new(AtomicUsize::new(0));
        let (a, b) = tokio::join!(
            upload(&instances[0].url, key, first, Arc::clone(&answered)),
            upload(&instances[1].url, key, second, answered),
        );
        [by_payment(&a), by_payment(&b)]
    });
    assert_eq!((on_first.len(), on_second.len()), (PAYMENTS, PAYMENTS), "every batch answered on both");
    for (id, first) in &on_first {
        let mut statuses = [first["status"].as_str().unwrap(), on_second[id]["status"].as_str().unwrap()];
        statuses.sort_unstable();
        assert_eq!(statuses, ["already_settled", "settled"], "{id}: {first} {}", on_second[id]);
        assert_eq!(first["receipt"], on_second[id]["receipt"], "one receipt per payment");
    }
    let payment_ids: Vec<String> = payments.into_iter().map(|(id, _)| id).collect();
    for instance in &instances {
        runtime.block_on(assert_settled_once(instance, &admin_key, &shop, &payment_ids));
    }
}
