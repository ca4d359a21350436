"""Build the bundled model's corpus from Debian's fortune files: one text, each fortune once,
fortunes separated by <|endoftext|>, in a fixed order that mixes the files.

    python corpus.py [/usr/share/games/fortunes] > corpus.txt

Every file is read but ascii-art (drawings, not prose) and the .dat indexes. In each fortune
the terminal effects go (overstrike pairs, a character then a backspace; bells and other
control characters but tab and newline), trailing whitespace goes, and a fortune that
appears in more than one file is kept once. The order is that of each fortune's sha256, so it does not depend
on the file order or on Python's random: validation (the last 5% of the stream) is a random
sample of all the files rather than the last few of them.
"""

import hashlib
import pathlib
import re
import sys

SKIP = {"ascii-art"}
OVERSTRIKE = re.compile(r".\x08")
# Bells and stray backspaces: terminal effects, not text.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def fortunes(directory: pathlib.Path):
    for path in sorted(directory.iterdir()):
        if path.suffix or path.name in SKIP or path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for piece in re.split(r"^%$", text, flags=re.M):
            piece = CONTROL.sub("", OVERSTRIKE.sub("", piece)).strip("\n").rstrip()
            if piece.strip():
                yield piece


def main() -> None:
    directory = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/games/fortunes")
    unique = {hashlib.sha256(f.encode("utf-8")).hexdigest(): f for f in fortunes(directory)}
    texts = [unique[key] for key in sorted(unique)]
    sys.stdout.write("<|endoftext|>".join(texts) + "\n")
    print(f"{len(texts)} fortunes, {sum(map(len, texts)):,} characters", file=sys.stderr)


if __name__ == "__main__":
    main()
