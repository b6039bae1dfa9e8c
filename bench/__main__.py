"""`python -m bench` (or `make bench`): every benchmark, one after the other. Not a test."""

from bench import bench_control, bench_llm, bench_resume, bench_speculation, bench_store, bench_stt

if __name__ == "__main__":
    bench_stt.main()
    print()
    bench_llm.main()
    print()
    bench_speculation.main()
    print()
    bench_control.main()
    print()
    bench_store.main()
    print()
    bench_resume.main()
