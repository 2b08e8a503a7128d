//! How warden's connections to PostgreSQL are set up.

#[tokio::test]
async fn options_given_in_the_database_url_reach_the_session() {
    // A hosted PostgreSQL may need options in the URL (an endpoint id);
    // warden's own session settings used to replace them.
    let db = crate::helpers::TestDb::migrated().await;
    let url = format!("{} options='-c work_mem=7777kB' application_name=ops-warden", db.url());
    let config: tokio_postgres::Config = url.parse().unwrap();
    let pool = warden::db::build_pool(config, &crate::helpers::default_settings().database).unwrap();
    let client = warden::db::client(&pool).await.unwrap();
    let row = client
        .query_one(
            "SELECT current_setting('work_mem'), current_setting('application_name'), \
                    current_setting('statement_timeout'), current_setting('TimeZone')",
            &[],
        )
        .await
        .unwrap();
    let got: (String, String, String, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(got.0, "7777kB", "the URL's option");
    assert_eq!(got.1, "ops-warden", "the URL's application name");
    assert_ne!(got.2, "0", "warden's statement timeout still applies");
    assert_eq!(got.3, "UTC");
}

#[tokio::test]
async fn an_unpaired_backslash_ending_the_urls_options_leaves_wardens_intact() {
    // The server drops a backslash that ends the options; followed by
    // warden's, it would escape the space before them and garble the
    // URL's last option and warden's first.
    let db = crate::helpers::TestDb::migrated().await;
    let url = format!("{} options='-c work_mem=7777kB\\\\'", db.url());
    let config: tokio_postgres::Config = url.parse().unwrap();
    assert_eq!(config.get_options(), Some("-c work_mem=7777kB\\"), "the URL as parsed");
    let pool = warden::db::build_pool(config, &crate::helpers::default_settings().database).unwrap();
    let client = warden::db::client(&pool).await.unwrap();
    let row = client
        .query_one("SELECT current_setting('work_mem'), current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    let got: (String, String) = (row.get(0), row.get(1));
    assert_eq!(got.0, "7777kB", "the URL's option");
    assert_ne!(got.1, "0", "warden's statement timeout still applies");
}
