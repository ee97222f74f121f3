"""Remove a torchvision that cannot import against the installed torch.

litdata declares torchvision as a dependency, but the PyPI wheel is built against CUDA torch and
breaks `import lightning` on a CPU torch ("operator torchvision::nms does not exist"). Nothing in
litgpt_ext needs torchvision, so a broken one is uninstalled; a working one (GPU clusters) stays.
"""

import subprocess
import sys


def main() -> int:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode == 0:
        print("torchvision imports fine; keeping it")
        return 0
    if "No module named" in probe.stderr:
        return 0
    print("torchvision is broken against this torch; uninstalling it:", probe.stderr.strip().splitlines()[-1])
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True)
    subprocess.run([sys.executable, "-c", "import lightning, litdata"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
