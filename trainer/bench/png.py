"""A small raster canvas that writes PNG files with the standard library alone.

The benchmarks' charts must work after a plain install, on every platform,
without matplotlib (an optional package a new user did not have: the scaling
benchmark once crashed on it after minutes of measuring). A chart here is a few
lines, markers and labels, so a canvas with lines, rectangles, markers and a
5x7 pixel font is enough. Text is drawn in capitals.

    canvas = Canvas(400, 200)
    canvas.line(10, 190, 390, 10, (31, 119, 180), width=2)
    canvas.text(200, 5, "tokens/s", (0, 0, 0), anchor="center")
    canvas.save("chart.png")
"""

import struct
import zlib

# 5x7 glyphs: 7 rows of 5 columns each ("#" = ink); "x_" is a small x, as in "1.9x".
_GLYPHS = {k: rows.replace(" ", "") for k, rows in {
    'A': '.###. #...# #...# ##### #...# #...# #...#', 'B': '####. #...# #...# ####. #...# #...# ####.',
    'C': '.###. #...# #.... #.... #.... #...# .###.', 'D': '###.. #..#. #...# #...# #...# #..#. ###..',
    'E': '##### #.... #.... ####. #.... #.... #####', 'F': '##### #.... #.... ####. #.... #.... #....',
    'G': '.###. #...# #.... #.### #...# #...# .####', 'H': '#...# #...# #...# ##### #...# #...# #...#',
    'I': '.###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.', 'J': '..### ...#. ...#. ...#. ...#. #..#. .##..',
    'K': '#...# #..#. #.#.. ##... #.#.. #..#. #...#', 'L': '#.... #.... #.... #.... #.... #.... #####',
    'M': '#...# ##.## #.#.# #.#.# #...# #...# #...#', 'N': '#...# #...# ##..# #.#.# #..## #...# #...#',
    'O': '.###. #...# #...# #...# #...# #...# .###.', 'P': '####. #...# #...# ####. #.... #.... #....',
    'Q': '.###. #...# #...# #...# #.#.# #..#. .##.#', 'R': '####. #...# #...# ####. #.#.. #..#. #...#',
    'S': '.#### #.... #.... .###. ....# ....# ####.', 'T': '##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..',
    'U': '#...# #...# #...# #...# #...# #...# .###.', 'V': '#...# #...# #...# #...# #...# .#.#. ..#..',
    'W': '#...# #...# #...# #.#.# #.#.# #.#.# .#.#.', 'X': '#...# #...# .#.#. ..#.. .#.#. #...# #...#',
    'Y': '#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..', 'Z': '##### ....# ...#. ..#.. .#... #.... #####',
    '0': '.###. #...# #..## #.#.# ##..# #...# .###.', '1': '..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.',
    '2': '.###. #...# ....# ...#. ..#.. .#... #####', '3': '##### ...#. ..#.. ...#. ....# #...# .###.',
    '4': '...#. ..##. .#.#. #..#. ##### ...#. ...#.', '5': '##### #.... ####. ....# ....# #...# .###.',
    '6': '..##. .#... #.... ####. #...# #...# .###.', '7': '##### ....# ...#. ..#.. .#... .#... .#...',
    '8': '.###. #...# #...# .###. #...# #...# .###.', '9': '.###. #...# #...# .#### ....# ...#. .##..',
    ' ': '..... ..... ..... ..... ..... ..... .....', '.': '..... ..... ..... ..... ..... .##.. .##..',
    ',': '..... ..... ..... ..... .##.. ..#.. .#...', '-': '..... ..... ..... ##### ..... ..... .....',
    '/': '..... ....# ...#. ..#.. .#... #.... .....', '%': '##... ##..# ...#. ..#.. .#... #..## ...##',
    '(': '...#. ..#.. .#... .#... .#... ..#.. ...#.', ')': '.#... ..#.. ...#. ...#. ...#. ..#.. .#...',
    ':': '..... .##.. .##.. ..... .##.. .##.. .....', '+': '..... ..#.. ..#.. ##### ..#.. ..#.. .....',
    '=': '..... ..... ##### ..... ##### ..... .....', '_': '..... ..... ..... ..... ..... ..... #####',
    '?': '.###. #...# ....# ...#. ..#.. ..... ..#..', 'x_': '..... ..... #...# .#.#. ..#.. .#.#. #...#',
    "'": '..#.. ..#.. .#... ..... ..... ..... .....', '#': '.#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.',
}.items()}
GLYPH_W, GLYPH_H = 5, 7


class Canvas:
    """An RGB image of ``width`` x ``height`` pixels on a background colour; (0, 0) is the top left.

    Args:
        width (int): Pixels across.
        height (int): Pixels down.
        background (tuple): RGB. Default: white.
    """

    def __init__(self, width: int, height: int, background: tuple = (255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def pixel(self, x: int, y: int, color: tuple) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i:i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple, fill: bool = True) -> None:
        """A rectangle from (x0, y0) to (x1, y1), both included; filled or as an outline."""
        x0, x1 = sorted((int(x0), int(x1)))
        y0, y1 = sorted((int(y0), int(y1)))
        if not fill:
            for x0_, y0_, x1_, y1_ in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
                self.rect(x0_, y0_, x1_, y1_, color)
            return
        x0, x1 = max(0, x0), min(self.width - 1, x1)
        row = bytes(color) * max(0, x1 - x0 + 1)
        for y in range(max(0, y0), min(self.height - 1, y1) + 1):
            i = (y * self.width + x0) * 3
            self.pixels[i:i + len(row)] = row

    def line(self, x0: float, y0: float, x1: float, y1: float, color: tuple, width: int = 1,
             dash: tuple | None = None) -> None:
        """A straight line ``width`` pixels thick; ``dash=(on, off)`` in pixels makes it dashed."""
        x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, step, half = dx + dy, 0, (width - 1) // 2
        while True:
            if dash is None or step % (dash[0] + dash[1]) < dash[0]:
                self.rect(x0 - half, y0 - half, x0 - half + width - 1, y0 - half + width - 1, color)
            if x0 == x1 and y0 == y1:
                return
            e2, step = 2 * err, step + 1
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def marker(self, x: float, y: float, color: tuple, shape: str = "o", size: int = 4) -> None:
        """A marker centred on (x, y): ``o`` (filled disc), ``s`` (hollow square) or ``x``."""
        x, y = int(round(x)), int(round(y))
        if shape == "s":
            self.rect(x - size, y - size, x + size, y + size, color, fill=False)
            self.rect(x - size + 1, y - size + 1, x + size - 1, y + size - 1, color, fill=False)
        elif shape == "x":
            self.line(x - size, y - size, x + size, y + size, color, width=2)
            self.line(x - size, y + size, x + size, y - size, color, width=2)
        else:
            for oy in range(-size, size + 1):
                for ox in range(-size, size + 1):
                    if ox * ox + oy * oy <= size * size:
                        self.pixel(x + ox, y + oy, color)

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        return max(0, len(text) * (GLYPH_W + 1) - 1) * scale

    def text(self, x: float, y: float, text: str, color: tuple, scale: int = 1, anchor: str = "left") -> None:
        """``text`` in capitals with its top at ``y``; ``anchor`` says where ``x`` is: left, center or right."""
        width = self.text_width(text, scale)
        x = int(x - {"left": 0, "center": width / 2, "right": width}[anchor])
        for i, char in enumerate(text):
            small_x = char == "x" and i > 0 and text[i - 1].isdigit()  # "1.9x", not "MLX"
            glyph = _GLYPHS.get("x_" if small_x else char.upper(), _GLYPHS["?"])
            for row in range(GLYPH_H):
                for col in range(GLYPH_W):
                    if glyph[row * GLYPH_W + col] == "#":
                        left = x + (i * (GLYPH_W + 1) + col) * scale
                        top = int(y) + row * scale
                        self.rect(left, top, left + scale - 1, top + scale - 1, color)

    def png_bytes(self) -> bytes:
        """The image as a PNG file (8-bit RGB, no filter, zlib level 9)."""
        stride = self.width * 3
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride]) for y in range(self.height))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))

    def save(self, path) -> None:
        with open(path, "wb") as f:
            f.write(self.png_bytes())
