fn main() {
    std::process::exit(unionmount::cli::main());
}
