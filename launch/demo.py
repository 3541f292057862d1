"""`make demo`: placeholder until the cascade issue lands; replaced by the end-to-end demo."""

from absl import app


def main(argv):
    del argv
    raise SystemExit("launch.demo is not built yet")


if __name__ == "__main__":
    app.run(main)
