"""The checked-in service files are what the installers would render with their defaults.

`python -m tests.service_examples` rewrites them after a change to the renderers or the
configuration templates; test_service_files fails when they are out of date.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sovereignd import config
from sovereignd.service import firewall, launchd, systemd
from tests.helpers import REPO


@dataclass(frozen=True)
class Layout:
    """An installer's default paths (the same values as its shell defaults)."""

    template: Path
    user: str
    prefix: Path
    etc: Path
    logs: Path
    home: Path
    model: Path

    def config_text(self) -> str:
        text = self.template.read_text()
        for key, value in (("USER", self.user), ("GROUP", self.user), ("PREFIX", self.prefix),
                           ("ETC", self.etc), ("LOGS", self.logs), ("HOME", self.home),
                           ("MODEL", self.model)):
            text = text.replace(f"@{key}@", str(value))
        return text

    def load(self) -> config.Config:
        """The configuration as if installed at its place (it need not exist here)."""
        return config.loads(self.config_text().encode(), self.etc / "sovereignd.yaml")

    @property
    def program(self) -> Path:
        return self.prefix / "venv" / "bin" / "sovereignd"


MACOS = Layout(REPO / "ops" / "macos" / "sovereignd.yaml.in", "_sovereignd",
               Path("/usr/local/sovereignd"), Path("/usr/local/etc/sovereignd"),
               Path("/usr/local/var/log/sovereignd"), Path("/usr/local/var/sovereignd"),
               Path("/usr/local/share/sovereignd/models/my-model"))
LINUX = Layout(REPO / "ops" / "linux" / "sovereignd.yaml.in", "sovereignd",
               Path("/opt/sovereignd"), Path("/etc/sovereignd"), Path("/var/log/sovereignd"),
               Path("/var/lib/sovereignd"), Path("/srv/models/my-model"))


def render_examples() -> dict[Path, bytes]:
    """Each example file and the bytes it should hold."""
    mac = MACOS.load()
    mac_spec = launchd.service_spec(mac, MACOS.program, MACOS.user, MACOS.user, MACOS.home)
    linux = LINUX.load()
    linux_spec = systemd.service_spec(linux, LINUX.program, LINUX.user, LINUX.user, LINUX.home)
    return {
        REPO / "launchd" / "org.sovereignd.plist": launchd.dumps(launchd.render(mac, mac_spec)),
        REPO / "launchd" / "newsyslog.d" / "sovereignd.conf":
            launchd.newsyslog_conf(mac, mac_spec).encode(),
        REPO / "ops" / "linux" / "sovereignd.service":
            systemd.render(linux, linux_spec).encode(),
        REPO / "ops" / "linux" / "sovereignd.nft": firewall.nft_rules(linux, LINUX.user).encode(),
        REPO / "ops" / "macos" / "pf.anchors" / "org.sovereignd":
            firewall.pf_anchor(mac, MACOS.user).encode(),
    }


if __name__ == "__main__":
    for path, data in render_examples().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path.relative_to(REPO)}")
