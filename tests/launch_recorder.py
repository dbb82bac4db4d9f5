"""A stand-in for a Triton kernel that records its launches, to check what Triton would compile them for."""


class LaunchRecorder:
    """Stands in for the Triton kernel: records each launch's arguments by name instead of running."""

    def __init__(self, kernel):
        self.names, self.launches = list(kernel.arg_names), []
        self.skip = set(kernel.kwargs["do_not_specialize"]) if hasattr(kernel, "kwargs") \
            else {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.names, args))
            named.update({k: v for k, v in kwargs.items() if k in self.names})
            self.launches.append(named)
        return launch

    def keys(self):
        """Per launch, what Triton would specialise the compiled kernel on: each specialised integer's class
        (== 1, divisible by 16, other) and every constexpr's value."""
        out = []
        for named in self.launches:
            key = {}
            for name, v in named.items():
                if isinstance(v, bool) or not isinstance(v, int) or name in self.skip:
                    continue
                key[name] = "one" if v == 1 else "x16" if v % 16 == 0 else "other"
            out.append(tuple(sorted(key.items())))
        return out
