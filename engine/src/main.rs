fn main() {
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("{}", rvllm::version_string());
        return;
    }
    eprintln!("rvllm: commands are being built");
    std::process::exit(2);
}
