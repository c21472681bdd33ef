package tenantpg

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/md5"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/stretchr/testify/require"
)

// A fake PostgreSQL server that speaks just enough of the protocol to
// authenticate a client (SCRAM-SHA-256 and -PLUS, md5, cleartext, trust)
// and reach ReadyForQuery. Its SCRAM side is written from RFC 5802 here,
// independently of scram.go, and each case is first checked against pgx's
// own exchange, so that a passing case says the fake is a faithful server.

const fakeUser, fakePassword = "fake_role", "fake-Pa55w0rd-plugh"

type fakePG struct {
	method string   // "scram" (default), "md5", "cleartext", "trust"
	mechs  []string // the SCRAM mechanisms offered; default SCRAM-SHA-256
	// badSignature makes the server-final-message's signature wrong in its
	// last byte: a server that does not hold the verifier.
	badSignature bool
	// negotiate sends NegotiateProtocolVersion before the auth request.
	negotiate bool
	// noticeLen, when set, sends a NoticeResponse with a message this long
	// before the auth request.
	noticeLen int
	tls       *tls.Config // accept SSLRequest when set
	certHash  []byte      // tls-server-end-point data of tls's certificate

	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	seen []fakeLogin
}

// fakeLogin is what the server saw of one login.
type fakeLogin struct {
	mech    string // SASL mechanism chosen
	gs2     string // GS2 header
	cbindOK bool   // c= matched the GS2 header (and the certificate)
	ok      bool   // the client's proof or password checked out
}

func startFakePG(t *testing.T, f *fakePG) string {
	t.Helper()
	if f.method == "" {
		f.method = "scram"
	}
	if f.mechs == nil {
		f.mechs = []string{scramMech}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f.ln = ln
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				f.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		f.wg.Wait()
	})
	return ln.Addr().String()
}

// record keeps what the server saw of a login before it answers the
// client's last message, so that a dial that has returned is recorded.
func (f *fakePG) record(l fakeLogin) {
	f.mu.Lock()
	f.seen = append(f.seen, l)
	f.mu.Unlock()
}

func (f *fakePG) logins() []fakeLogin {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fakeLogin(nil), f.seen...)
}

func (f *fakePG) serve(c net.Conn) {
	var login fakeLogin
	var conn net.Conn = c
	be := pgproto3.NewBackend(conn, conn)
	msg, err := be.ReceiveStartupMessage()
	if err != nil {
		return
	}
	if _, ok := msg.(*pgproto3.SSLRequest); ok {
		if f.tls == nil {
			_, _ = c.Write([]byte("N"))
		} else {
			_, _ = c.Write([]byte("S"))
			conn = tls.Server(c, f.tls)
			be = pgproto3.NewBackend(conn, conn)
		}
		if msg, err = be.ReceiveStartupMessage(); err != nil {
			return
		}
	}
	if _, ok := msg.(*pgproto3.StartupMessage); !ok {
		return
	}
	if f.negotiate {
		be.Send(&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0})
	}
	if f.noticeLen > 0 {
		be.Send(&pgproto3.NoticeResponse{Severity: "NOTICE", Code: "00000", Message: strings.Repeat("n", f.noticeLen)})
	}
	switch f.method {
	case "trust":
		login.ok = true
	case "cleartext", "md5":
		var salt [4]byte
		_, _ = rand.Read(salt[:])
		want := fakePassword
		if f.method == "md5" {
			be.Send(&pgproto3.AuthenticationMD5Password{Salt: salt})
			_ = be.SetAuthType(pgproto3.AuthTypeMD5Password)
			inner := md5.Sum([]byte(fakePassword + fakeUser))
			outer := md5.Sum(append([]byte(hex.EncodeToString(inner[:])), salt[:]...))
			want = "md5" + hex.EncodeToString(outer[:])
		} else {
			be.Send(&pgproto3.AuthenticationCleartextPassword{})
			_ = be.SetAuthType(pgproto3.AuthTypeCleartextPassword)
		}
		if be.Flush() != nil {
			return
		}
		m, err := be.Receive()
		if err != nil {
			return
		}
		pm, _ := m.(*pgproto3.PasswordMessage)
		login.ok = pm != nil && pm.Password == want
	default:
		if !f.scram(be, &login) {
			return
		}
	}
	if f.method != "scram" {
		f.record(login) // scram records before its final message
	}
	if !login.ok {
		be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "28P01", Message: "password authentication failed for user \"" + fakeUser + "\""})
		_ = be.Flush()
		return
	}
	be.Send(&pgproto3.AuthenticationOk{})
	be.Send(&pgproto3.ParameterStatus{Name: "server_version", Value: "15.0"})
	be.Send(&pgproto3.BackendKeyData{ProcessID: 42, SecretKey: []byte{0, 0, 0, 7}})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if be.Flush() != nil {
		return
	}
	for { // until Terminate or EOF
		if m, err := be.Receive(); err != nil {
			return
		} else if _, ok := m.(*pgproto3.Terminate); ok {
			return
		}
	}
}

// scram runs the server side of SCRAM-SHA-256 (RFC 5802) for fakePassword,
// salt "fake-salt-16byte", 4096 iterations. It returns false when the
// connection ended.
func (f *fakePG) scram(be *pgproto3.Backend, login *fakeLogin) bool {
	salt := []byte("fake-salt-16byte")
	salted, _ := pbkdf2.Key(sha256.New, fakePassword, salt, 4096, 32)
	mac := func(key []byte, msg string) []byte {
		m := hmac.New(sha256.New, key)
		m.Write([]byte(msg))
		return m.Sum(nil)
	}
	clientKey := mac(salted, "Client Key")
	storedKey := sha256.Sum256(clientKey)
	serverKey := mac(salted, "Server Key")

	be.Send(&pgproto3.AuthenticationSASL{AuthMechanisms: f.mechs})
	_ = be.SetAuthType(pgproto3.AuthTypeSASL)
	if be.Flush() != nil {
		return false
	}
	m, err := be.Receive()
	if err != nil {
		return false
	}
	init, ok := m.(*pgproto3.SASLInitialResponse)
	if !ok {
		return false
	}
	login.mech = init.AuthMechanism
	first := string(init.Data)
	// gs2-header = cbind-flag "," [authzid] ","
	i := strings.IndexByte(first, ',')
	j := strings.IndexByte(first[i+1:], ',')
	if i < 0 || j < 0 {
		return false
	}
	login.gs2 = first[:i+1+j+1]
	bare := first[len(login.gs2):]
	clientNonce, ok := strings.CutPrefix(bare, "n=,r=")
	if !ok {
		return false
	}
	serverFirst := "r=" + clientNonce + "fake-server-nonce,s=" + base64.StdEncoding.EncodeToString(salt) + ",i=4096"
	be.Send(&pgproto3.AuthenticationSASLContinue{Data: []byte(serverFirst)})
	_ = be.SetAuthType(pgproto3.AuthTypeSASLContinue)
	if be.Flush() != nil {
		return false
	}
	if m, err = be.Receive(); err != nil {
		return false
	}
	resp, ok := m.(*pgproto3.SASLResponse)
	if !ok {
		return false
	}
	final := string(resp.Data)
	k := strings.LastIndex(final, ",p=")
	if k < 0 {
		return false
	}
	withoutProof, proofB64 := final[:k], final[k+3:]
	cbindB64, _, _ := strings.Cut(strings.TrimPrefix(withoutProof, "c="), ",")
	cbind, _ := base64.StdEncoding.DecodeString(cbindB64)
	wantCbind := []byte(login.gs2)
	if strings.HasPrefix(login.gs2, "p=tls-server-end-point,") {
		wantCbind = append(wantCbind, f.certHash...)
	}
	login.cbindOK = bytes.Equal(cbind, wantCbind)

	authMsg := bare + "," + serverFirst + "," + withoutProof
	proof, _ := base64.StdEncoding.DecodeString(proofB64)
	clientSig := mac(storedKey[:], authMsg)
	if len(proof) == len(clientSig) {
		for i := range proof {
			proof[i] ^= clientSig[i]
		}
		got := sha256.Sum256(proof)
		login.ok = login.cbindOK && hmac.Equal(got[:], storedKey[:])
	}
	f.record(*login)
	if !login.ok {
		return true // the caller sends 28P01, as PostgreSQL does
	}
	sig := mac(serverKey, authMsg)
	if f.badSignature {
		sig[len(sig)-1] ^= 1
	}
	be.Send(&pgproto3.AuthenticationSASLFinal{Data: []byte("v=" + base64.StdEncoding.EncodeToString(sig))})
	return true
}

// selfSignedTLS returns a server TLS config with a fresh ECDSA P-256
// certificate (signed with SHA-256) and the certificate's
// tls-server-end-point hash, computed here from its DER.
func selfSignedTLS(t *testing.T) (*tls.Config, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "fake-pg"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	require.Equal(t, x509.ECDSAWithSHA256, cert.SignatureAlgorithm)
	h := sha256.Sum256(der)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}, h[:]
}

// fakeDial connects to the fake server with pgconn, through the cache's hook
// when cache is not nil, else on pgx's own path.
func fakeDial(t *testing.T, addr string, cache *scramCache, params string) error {
	t.Helper()
	cfg, err := pgconn.ParseConfig(fmt.Sprintf("postgres://%s:%s@%s/fake?%s", fakeUser, fakePassword, addr, params))
	require.NoError(t, err)
	if cache != nil {
		cfg.AfterNetConnect = cache.hook(cfg.AfterNetConnect)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	require.Equal(t, uint32(42), pc.PID(), "pgx read what followed authentication")
	return pc.Close(ctx)
}

func TestScramFakeServerSignature(t *testing.T) {
	f := &fakePG{badSignature: true}
	addr := startFakePG(t, f)

	err := fakeDial(t, addr, nil, "sslmode=disable")
	require.ErrorContains(t, err, "invalid SCRAM ServerSignature", "pgx itself refuses this server: the fake is a faithful impostor")

	cache := newScramCache()
	for range 2 { // the second dial uses the cached keys, and still checks
		err = fakeDial(t, addr, cache, "sslmode=disable")
		require.ErrorIs(t, err, ErrScramServerSignature)
		require.NotContains(t, err.Error(), fakePassword)
	}
	require.Equal(t, uint64(1), cache.derivations.Load())
	logins := f.logins()
	require.Len(t, logins, 3)
	for _, l := range logins {
		require.True(t, l.ok, "the client's proof was right; only the server's signature was not: %+v", logins)
	}

	// Through the driver, the error stays matchable and holds no secret.
	drv, err := NewDriver(Config{})
	require.NoError(t, err)
	defer drv.Close()
	db, err := drv.OpenDB(fmt.Sprintf("postgres://%s:%s@%s/fake?sslmode=disable", fakeUser, fakePassword, addr))
	require.NoError(t, err)
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = db.PingContext(ctx)
	require.ErrorIs(t, err, ErrScramServerSignature)
	var ce *ConnectError
	require.ErrorAs(t, err, &ce)
	require.NotContains(t, err.Error(), fakePassword)
}

func TestScramFakeServerGood(t *testing.T) {
	f := &fakePG{negotiate: true}
	addr := startFakePG(t, f)
	require.NoError(t, fakeDial(t, addr, nil, "sslmode=disable"), "pgx's own exchange")
	cache := newScramCache()
	for range 3 {
		require.NoError(t, fakeDial(t, addr, cache, "sslmode=disable"))
	}
	require.Equal(t, uint64(1), cache.derivations.Load(), "PBKDF2 ran for the first dial only")
	for _, l := range f.logins() {
		require.Equal(t, fakeLogin{mech: scramMech, gs2: "n,,", cbindOK: true, ok: true}, l)
	}
}

func TestScramFakeServerChannelBinding(t *testing.T) {
	tlsCfg, certHash := selfSignedTLS(t)
	plus := []string{scramMechPlus, scramMech}
	for _, tc := range []struct {
		name        string
		mechs       []string
		params      string
		want        fakeLogin
		derivations uint64 // 0: pgx's own exchange ran
	}{
		{"plus offered", plus, "sslmode=require",
			fakeLogin{mech: scramMechPlus, gs2: "p=tls-server-end-point,,", cbindOK: true, ok: true}, 1},
		{"plus not offered", []string{scramMech}, "sslmode=require",
			fakeLogin{mech: scramMech, gs2: "y,,", cbindOK: true, ok: true}, 1},
		{"binding disabled", plus, "sslmode=require&channel_binding=disable",
			fakeLogin{mech: scramMech, gs2: "n,,", cbindOK: true, ok: true}, 1},
		{"binding required: pgx's path", plus, "sslmode=require&channel_binding=require",
			fakeLogin{mech: scramMechPlus, gs2: "p=tls-server-end-point,,", cbindOK: true, ok: true}, 0},
		{"require_auth: pgx's path", plus, "sslmode=require&require_auth=scram-sha-256",
			fakeLogin{mech: scramMechPlus, gs2: "p=tls-server-end-point,,", cbindOK: true, ok: true}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakePG{mechs: tc.mechs, tls: tlsCfg, certHash: certHash}
			addr := startFakePG(t, f)
			require.NoError(t, fakeDial(t, addr, nil, tc.params), "pgx's own exchange")
			cache := newScramCache()
			require.NoError(t, fakeDial(t, addr, cache, tc.params))
			require.NoError(t, fakeDial(t, addr, cache, tc.params))
			require.Equal(t, tc.derivations, cache.derivations.Load())
			logins := f.logins()
			require.Len(t, logins, 3)
			for _, l := range logins {
				require.Equal(t, tc.want, l, "pgx and the cache negotiate alike")
			}
		})
	}
}

// Other methods pass through: the wrapper hands pgx the server's bytes as
// they came, and pgx answers them.
func TestScramFakeServerOtherMethods(t *testing.T) {
	for _, method := range []string{"md5", "cleartext", "trust"} {
		t.Run(method, func(t *testing.T) {
			f := &fakePG{method: method, negotiate: method == "md5"}
			addr := startFakePG(t, f)
			cache := newScramCache()
			require.NoError(t, fakeDial(t, addr, cache, "sslmode=disable"))
			require.Zero(t, cache.derivations.Load())
			require.True(t, f.logins()[0].ok)
		})
	}
}

// A server that asks for a PBKDF2 beyond any real setting fails the dial
// before the client spends the CPU.
func TestScramServerFirstBounds(t *testing.T) {
	cv := newScramConv("n,,", nil)
	cache := newScramCache()
	salt := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef"))
	for _, sf := range []string{
		"r=" + cv.nonce + "x,s=" + salt + ",i=10000001",
		"r=" + cv.nonce + "x,s=" + salt + ",i=0",
		"r=" + cv.nonce + ",s=" + salt + ",i=4096",      // no server nonce
		"r=other" + cv.nonce + ",s=" + salt + ",i=4096", // not the client's
		"m=ext,r=" + cv.nonce + "x,s=" + salt + ",i=4096",
		"r=" + cv.nonce + "x,s=!!,i=4096",
	} {
		_, err := cv.clientFinal(context.Background(), cache, "pw", []byte(sf))
		require.Error(t, err, sf)
	}
	require.Zero(t, cache.derivations.Load())
	_, err := cv.clientFinal(context.Background(), cache, "pw", []byte("r="+cv.nonce+"x,s="+salt+",i=4096"))
	require.NoError(t, err)
	require.ErrorIs(t, cv.verify([]byte("v=AAAA")), ErrScramServerSignature)
}

// Messages before the auth request reach pgx as sent. One too large for the
// wrapper's startup buffer makes it step aside, and pgx authenticates.
func TestScramFakeServerMessagesBeforeAuth(t *testing.T) {
	for _, tc := range []struct {
		noticeLen   int
		derivations uint64
	}{{100, 1}, {5 * scramStartupBuf, 0}} {
		t.Run(fmt.Sprint(tc.noticeLen), func(t *testing.T) {
			f := &fakePG{negotiate: true, noticeLen: tc.noticeLen}
			addr := startFakePG(t, f)
			var notices []string
			cfg, err := pgconn.ParseConfig(fmt.Sprintf("postgres://%s:%s@%s/fake?sslmode=disable", fakeUser, fakePassword, addr))
			require.NoError(t, err)
			cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, n.Message) }
			cache := newScramCache()
			cfg.AfterNetConnect = cache.hook(nil)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			pc, err := pgconn.ConnectConfig(ctx, cfg)
			require.NoError(t, err)
			require.NoError(t, pc.Close(ctx))
			require.Equal(t, []string{strings.Repeat("n", tc.noticeLen)}, notices)
			require.Equal(t, tc.derivations, cache.derivations.Load())
			require.True(t, f.logins()[0].ok)
		})
	}
}

// The cache holds at most scramCacheSize keys, the least recently used
// leaving first, and a dial waiting for another's derivation gives up when
// its context ends.
func TestScramCacheBoundAndWait(t *testing.T) {
	c := newScramCache()
	ctx := context.Background()
	salt := []byte("0123456789abcdef")
	first, err := c.keys(ctx, "pw-0", salt, 1)
	require.NoError(t, err)
	for i := 1; i <= scramCacheSize; i++ {
		if i == scramCacheSize/2 {
			again, err := c.keys(ctx, "pw-0", salt, 1) // recently used again
			require.NoError(t, err)
			require.Equal(t, first, again)
		}
		_, err := c.keys(ctx, fmt.Sprintf("pw-%d", i), salt, 1)
		require.NoError(t, err)
	}
	require.Len(t, c.entries, scramCacheSize)
	require.Equal(t, scramCacheSize, c.lru.len)
	require.Equal(t, uint64(scramCacheSize+1), c.derivations.Load())
	_, err = c.keys(ctx, "pw-0", salt, 1)
	require.NoError(t, err)
	require.Equal(t, uint64(scramCacheSize+1), c.derivations.Load(), "pw-0 was kept")
	_, err = c.keys(ctx, "pw-1", salt, 1)
	require.NoError(t, err)
	require.Equal(t, uint64(scramCacheSize+2), c.derivations.Load(), "pw-1 was the least recently used")
	require.Equal(t, "scramKeys(redacted) scramKeys(redacted)", fmt.Sprintf("%v %+v", first, first), "keys never print")

	// A derivation under way: its entry's ready is not yet closed.
	name := c.name("slow", salt, 4096)
	c.mu.Lock()
	c.entries[name] = &scramEntry{name: name, ready: make(chan struct{})}
	c.mu.Unlock()
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = c.keys(cctx, "slow", salt, 4096)
	require.ErrorIs(t, err, context.Canceled)

	c.setOff(true)
	require.Empty(t, c.entries)
	require.Zero(t, c.lru.len)
}
