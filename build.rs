// The migrations are compiled into the binary (refinery's
// embed_migrations!), but cargo does not know that: without this, adding
// or editing one rebuilds nothing, and the binary and the test template
// keep the old schema.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
