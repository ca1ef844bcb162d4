"""Test credentials made with certtool and psktool: two CAs, server and
client certificates (an expired, a revoked and an impostor one among
them), a CRL, and PSK files.  Shared by the tests that use TLS."""
import shutil

from helpers import run


def _certtool(*args):
    run(["certtool"] + list(args), timeout=30)


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


class PKI:
    """Paths of the test credentials.

    CA 'A' signs the server certificate (localhost, 127.0.0.1) and the
    client certificates client1, client2, 'expired' (valid in 2020
    only) and 'revoked' (listed in A's CRL).  CA 'B' signs a second
    server certificate and the 'impostor' client certificate.  The
    expired, revoked and impostor certificates all carry client1's
    subject, so that only their verification tells them from client1.

    Directories for nbdd (--tls-certificates): server (CA A, no CRL),
    server-crl (with A's CRL).  Directories for clients (libnbd, qemu):
    client1, client2, expired, revoked, impostor (each trusting CA A,
    with its client certificate), anon (CA A, no client certificate),
    trust-b (CA B only, no client certificate).

    PSK files: psk/keys.psk (alice, bob), psk-wrong/keys.psk (alice
    with another key), psk-carol/keys.psk (a user nbdd does not know).
    """

    def __init__(self, d):
        self.dir = d
        self.work = d / "work"
        self.work.mkdir()

    def sub(self, name):
        return str(self.dir / name)

    def _key(self, name):
        path = str(self.work / f"{name}-key.pem")
        _certtool("--generate-privkey", "--key-type=ecdsa",
                  "--outfile", path)
        return path

    def _ca(self, name, cn):
        key = self._key(name)
        tmpl = write_file(self.work / f"{name}.tmpl",
                      f'cn = "{cn}"\nca\ncert_signing_key\n'
                      "crl_signing_key\nexpiration_days = 3650\n")
        cert = str(self.work / f"{name}-cert.pem")
        _certtool("--generate-self-signed", "--load-privkey", key,
                  "--template", tmpl, "--outfile", cert)
        return cert, key

    def _cert(self, name, ca, template):
        key = self._key(name)
        tmpl = write_file(self.work / f"{name}.tmpl", template)
        cert = str(self.work / f"{name}-cert.pem")
        _certtool("--generate-certificate", "--load-privkey", key,
                  "--load-ca-certificate", ca[0], "--load-ca-privkey", ca[1],
                  "--template", tmpl, "--outfile", cert)
        return cert, key

    def _dir(self, name, files):
        d = self.dir / name
        d.mkdir()
        for dst, src in files.items():
            shutil.copy(src, d / dst)
        return str(d)

    def make(self):
        server_t = ('cn = "localhost"\norganization = "nbdd test"\n'
                    'dns_name = "localhost"\nip_address = "127.0.0.1"\n'
                    "tls_www_server\nencryption_key\nsigning_key\n"
                    "expiration_days = 3650\n")

        def client_t(cn, dates="expiration_days = 3650\n"):
            return (f'cn = "{cn}"\norganization = "nbdd test"\n'
                    'country = "GB"\ntls_www_client\nencryption_key\n'
                    "signing_key\n" + dates)

        a = self._ca("ca-a", "nbdd test CA A")
        b = self._ca("ca-b", "nbdd test CA B")
        self.ca_a, self.ca_b = a[0], b[0]
        srv_a = self._cert("server-a", a, server_t)
        srv_b = self._cert("server-b", b, server_t)
        c1 = self._cert("client1", a, client_t("client1"))
        c2 = self._cert("client2", a, client_t("client2"))
        expired = self._cert("expired", a, client_t(
            "client1", 'activation_date = "2019-01-01 00:00:00 UTC"\n'
            'expiration_date = "2020-01-01 00:00:00 UTC"\n'))
        revoked = self._cert("revoked", a, client_t("client1"))
        impostor = self._cert("impostor", b, client_t("client1"))
        crl_t = write_file(self.work / "crl.tmpl",
                       "crl_next_update = 3650\ncrl_number = 1\n")
        crl = str(self.work / "ca-a-crl.pem")
        _certtool("--generate-crl", "--load-ca-privkey", a[1],
                  "--load-ca-certificate", a[0],
                  "--load-certificate", revoked[0],
                  "--template", crl_t, "--outfile", crl)

        self.server_a, self.server_b = srv_a, srv_b
        self.server = self._dir("server", {
            "ca-cert.pem": a[0], "server-cert.pem": srv_a[0],
            "server-key.pem": srv_a[1]})
        self.server_crl = self._dir("server-crl", {
            "ca-cert.pem": a[0], "server-cert.pem": srv_a[0],
            "server-key.pem": srv_a[1], "ca-crl.pem": crl})
        for name, (cert, key) in (("client1", c1), ("client2", c2),
                                  ("expired", expired),
                                  ("revoked", revoked),
                                  ("impostor", impostor)):
            self._dir(name, {"ca-cert.pem": a[0], "client-cert.pem": cert,
                             "client-key.pem": key})
        self.certs = {name: self.sub(name) for name in
                      ("client1", "client2", "expired", "revoked",
                       "impostor")}
        # The server's own certificate offered by a client: signed by
        # CA A, but made for a TLS server, so it names no client.
        self.certs["wrong-purpose"] = self._dir("wrong-purpose", {
            "ca-cert.pem": a[0], "client-cert.pem": srv_a[0],
            "client-key.pem": srv_a[1]})
        self.certs["anon"] = self._dir("anon", {"ca-cert.pem": a[0]})
        self.certs["trust-b"] = self._dir("trust-b", {"ca-cert.pem": b[0]})
        self.client1 = c1
        self.impostor = impostor

        for name, users in (("psk", ["alice", "bob"]),
                            ("psk-wrong", ["alice"]),
                            ("psk-carol", ["carol"])):
            (self.dir / name).mkdir()
            for u in users:
                run(["psktool", "-u", u, "-p",
                     str(self.dir / name / "keys.psk")], timeout=30)
        self.psk = self.sub("psk/keys.psk")
        self.psk_wrong = self.sub("psk-wrong/keys.psk")
        self.psk_carol = self.sub("psk-carol/keys.psk")
        return self
