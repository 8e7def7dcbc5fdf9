use super::*;
use crate::adapter::{Components, Mask, Method, Softmax, Task};

fn task(name: &str, deps: &[Digest]) -> Task {
    Task {
        name: name.into(),
        labels: alloc::vec!["a".into(), "b".into()],
        method: Method::Supsup,
        components: Components { masks: alloc::vec![Mask { len: 40, words: alloc::vec![7, 1] }], ..Default::default() },
        depends_on: deps.to_vec(),
        config: "{}".into(),
        metrics: Vec::new(),
        created_at: 1,
        version: 3,
        softmax: Softmax::Classes,
    }
}

#[test]
fn round_trip_signed_and_unsigned() {
    let bb = [5u8; 32];
    let a = task::encode(&task("a", &[]), &bb);
    let da = task::digest_of(&a).unwrap();
    let b = task::encode(&task("b", &[da]), &bb);
    let key = SigningKey::from_bytes(&[1; 32]);
    let signed = create(&bb, &[&a, &b], Some(&key)).unwrap();
    let bundle = open(&signed, &[key.verifying_key()], false).unwrap();
    assert_eq!(bundle.backbone, bb);
    assert_eq!(bundle.signer(), Some(&key.verifying_key()));
    assert_eq!(bundle.tasks.len(), 2);
    assert_eq!((bundle.tasks[0].name.as_str(), bundle.tasks[0].bytes), ("a", &a[..]));
    assert_eq!(
        (bundle.tasks[1].version, &bundle.tasks[1].depends_on[..], bundle.tasks[1].bytes),
        (3, &[da][..], &b[..])
    );
    assert!(bundle.missing_dependencies(&[]).is_empty());
    let unsigned = create(&bb, &[&a, &b], None).unwrap();
    assert_eq!(open(&unsigned, &[key.verifying_key()], false), Err(BundleError::Unsigned));
    assert_eq!(open(&unsigned, &[], true).unwrap().signature, SignatureStatus::Unsigned);
    // The two differ only in the signature block and trailer.
    let body = signed.len() - SIGNATURE_BLOCK_LEN - TRAILER_LEN;
    assert_eq!(signed[..body], unsigned[..body]);
}

#[test]
fn a_missing_dependency_is_reported_per_task() {
    let bb = [5u8; 32];
    let b = task::encode(&task("b", &[[1; 32], [2; 32]]), &bb);
    let bytes = create(&bb, &[&b], None).unwrap();
    let bundle = inspect(&bytes).unwrap();
    assert_eq!(
        bundle.missing_dependencies(&[[1; 32]]),
        alloc::vec![MissingDependency { task: "b".into(), digest: [2; 32] }]
    );
    assert_eq!(bundle.missing_dependencies(&[[2; 32], [1; 32]]), alloc::vec![]);
}
