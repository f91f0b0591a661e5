from megatron_c2r.megatron_lm.entry import main

if __name__ == "__main__":
    raise SystemExit(main())
