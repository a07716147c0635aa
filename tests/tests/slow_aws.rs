//! The slowed local AWS (`LOCAL_AWS_DELAY`, `scripts/slow-check aws`): the proxy in front of each
//! moto process changes how long answers take and nothing else.
use std::time::Duration;

use aws_proxy::Delay;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use gateway_tests::LocalAws;
use testkit::local_aws::read_object;

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn new_queue(sqs: &aws_sdk_sqs::Client) -> String {
    sqs.create_queue()
        .queue_name(unique("slow"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap()
}

#[tokio::test]
async fn through_the_slowing_proxy_every_service_answers_as_moto_does() {
    let aws = LocalAws::launch_with(Delay::Slowdown(3.0));
    let sdk = aws.sdk_config().await;

    // DynamoDB: a table, an item written and read back.
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    let table = unique("slow");
    dynamodb
        .create_table()
        .table_name(&table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    dynamodb
        .put_item()
        .table_name(&table)
        .item("pk", AttributeValue::S("a".into()))
        .item("n", AttributeValue::N("7".into()))
        .send()
        .await
        .unwrap();
    let item = dynamodb
        .get_item()
        .table_name(&table)
        .key("pk", AttributeValue::S("a".into()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert_eq!(item["n"], AttributeValue::N("7".into()));

    // SQS: the queue URL names the proxy (moto writes the Host it was sent), and a message
    // goes through it and back.
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let queue_url = new_queue(&sqs).await;
    assert!(
        queue_url.starts_with(aws.sqs()),
        "{queue_url} does not go through {}",
        aws.sqs()
    );
    sqs.send_message()
        .queue_url(&queue_url)
        .message_body("hello")
        .send()
        .await
        .unwrap();
    let received = sqs
        .receive_message()
        .queue_url(&queue_url)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    assert_eq!(received.messages()[0].body(), Some("hello"));

    // S3: a 1 MiB object in and out, its size in a HEAD answer (which has no body), and a
    // presigned URL that works through the proxy.
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let bucket = unique("slow");
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let body: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    s3.put_object()
        .bucket(&bucket)
        .key("k")
        .body(body.clone().into())
        .send()
        .await
        .unwrap();
    let head = s3
        .head_object()
        .bucket(&bucket)
        .key("k")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(body.len() as i64));
    assert_eq!(read_object(&s3, &bucket, "k").await, body);
    let presigned = s3
        .get_object()
        .bucket(&bucket)
        .key("k")
        .presigned(
            aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(60)).unwrap(),
        )
        .await
        .unwrap();
    let fetched = reqwest::get(presigned.uri()).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), body.as_slice());
}

#[tokio::test]
async fn a_threefold_slowdown_holds_each_answer_back_twice_as_long_as_moto_took() {
    let aws = LocalAws::launch_with(Delay::Slowdown(3.0));
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk_config().await);
    for _ in 0..5 {
        new_queue(&sqs).await;
    }
    // Counted by the proxy, not timed by the test: true on any machine.
    let (requests, upstream, added) = aws.proxy_stats()["SQS"];
    assert!(requests >= 5, "{requests} requests");
    let expected = upstream * 2;
    let rounding = Duration::from_micros(2 * requests);
    assert!(
        added + rounding >= expected && added <= expected + rounding,
        "added {added:?} for {upstream:?} upstream"
    );
}

#[tokio::test]
async fn a_long_poll_is_held_back_by_an_average_answer_not_by_its_wait() {
    let aws = LocalAws::launch_with(Delay::Slowdown(3.0));
    let sqs = aws_sdk_sqs::Client::new(&aws.sdk_config().await);
    let queue_url = new_queue(&sqs).await;
    // Until now every call worked (no long poll): their average is the answer's measure.
    let (requests_before, upstream_before, added_before) = aws.proxy_stats()["SQS"];
    let average = upstream_before / requests_before as u32;
    // An empty queue: moto holds the receive for its whole second.
    sqs.receive_message()
        .queue_url(&queue_url)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let (_, upstream, added) = aws.proxy_stats()["SQS"];
    assert!(
        upstream - upstream_before >= Duration::from_secs(1),
        "moto answered an empty long poll in {:?}",
        upstream - upstream_before
    );
    // Stretched like its wait, it would be held 2 s more; stretched like an answer, twice the
    // average of the calls before it. Counted by the proxy: true on any machine.
    let for_the_poll = added - added_before;
    let rounding = Duration::from_micros(2 * requests_before + 2);
    assert!(
        for_the_poll + rounding >= average * 2 && for_the_poll <= average * 2 + rounding,
        "held back {for_the_poll:?}, twice the average answer is {:?}",
        average * 2
    );
}
