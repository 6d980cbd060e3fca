package graceful

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Listen returns the stream listener for network and addr: the one inherited
// from the old process, else a systemd-activated socket with that address or
// name (fresh start only), else a newly bound one. network is "tcp", "tcp4",
// "tcp6" or "unix". The listener is passed on to the next process on
// upgrade; a Unix socket file is kept across upgrades and removed when the
// process drains without a successor. A stale socket file left by a crashed
// process is replaced; one a live process accepts on is an error.
//
// When the drain starts (after [Options.DrainDelay]) the listener is closed
// so that every new connection goes to the successor: Accept then returns
// an error wrapping [net.ErrClosed], which a server registered with
// [Process.Add] should treat as its end.
func (p *Process) Listen(network, addr string) (net.Listener, error) {
	switch network {
	case "tcp", "tcp4", "tcp6", "unix":
	default:
		return nil, fmt.Errorf("graceful: listen %s %s: unsupported network %q (want tcp, tcp4, tcp6 or unix)", network, addr, network)
	}
	ln, err := p.listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("graceful: listen %s %s: %w", network, addr, err)
	}
	p.addListener(ln)
	return ln, nil
}

// ListenPacket is [Process.Listen] for datagram sockets: network is "udp",
// "udp4", "udp6" or "unixgram".
func (p *Process) ListenPacket(network, addr string) (net.PacketConn, error) {
	switch network {
	case "udp", "udp4", "udp6", "unixgram":
	default:
		return nil, fmt.Errorf("graceful: listen %s %s: unsupported network %q (want udp, udp4, udp6 or unixgram)", network, addr, network)
	}
	c, err := p.listenPacket(network, addr)
	if err != nil {
		return nil, fmt.Errorf("graceful: listen %s %s: %w", network, addr, err)
	}
	return c, nil
}

// bindStream binds a new listener, replacing a stale Unix socket file.
func bindStream(network, addr string) (net.Listener, error) {
	ln, err := net.Listen(network, addr)
	if err == nil || network != "unix" || !errors.Is(err, syscall.EADDRINUSE) {
		return ln, err
	}
	if rerr := removeStaleSocket("unix", addr); rerr != nil {
		return nil, rerr
	}
	return net.Listen(network, addr)
}

func bindPacket(network, addr string) (net.PacketConn, error) {
	c, err := net.ListenPacket(network, addr)
	if err == nil || network != "unixgram" || !errors.Is(err, syscall.EADDRINUSE) {
		return c, err
	}
	if rerr := removeStaleSocket("unixgram", addr); rerr != nil {
		return nil, rerr
	}
	return net.ListenPacket(network, addr)
}

// removeStaleSocket removes path if it is a socket nobody listens on.
func removeStaleSocket(network, path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	c, err := net.DialTimeout(network, path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s is in use by a running process", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: cannot tell whether it is stale: %w", path, err)
	}
	return os.Remove(path)
}

// sameAddr reports whether a socket bound to have satisfies a request for
// network and addr.
func sameAddr(network, addr string, have net.Addr) bool {
	switch h := have.(type) {
	case *net.UnixAddr:
		return (network == "unix" || network == "unixgram") && filepath.Clean(addr) == filepath.Clean(h.Name)
	case *net.TCPAddr:
		if network != "tcp" && network != "tcp4" && network != "tcp6" {
			return false
		}
		want, err := net.ResolveTCPAddr(network, addr)
		return err == nil && sameIPPort(want.IP, want.Port, h.IP, h.Port)
	case *net.UDPAddr:
		if network != "udp" && network != "udp4" && network != "udp6" {
			return false
		}
		want, err := net.ResolveUDPAddr(network, addr)
		return err == nil && sameIPPort(want.IP, want.Port, h.IP, h.Port)
	}
	return false
}

func sameIPPort(wantIP net.IP, wantPort int, haveIP net.IP, havePort int) bool {
	if wantPort != havePort {
		return false
	}
	if wantIP == nil || wantIP.IsUnspecified() {
		return haveIP == nil || haveIP.IsUnspecified()
	}
	return wantIP.Equal(haveIP)
}

// tracker holds every connection accepted through one served listener. It
// is the single place connections are counted; their HTTP state, kept on
// each trackedConn, is guarded by mu.
type tracker struct {
	mu         sync.Mutex
	conns      map[*trackedConn]struct{}
	changed    chan struct{} // closed on the next change; nil while nobody waits
	draining   bool
	drainStart time.Time
	// handoff, set during a drain with a successor, passes a claimed
	// connection on; handed counts those it passed.
	handoff func(net.Conn) error
	handed  atomic.Int64
	log     *slog.Logger // debug records of connections closed, not passed on, during a hand-off
	key     string       // ServeConns: the listener's address, for HandOff
}

func newTracker() *tracker {
	return &tracker{conns: make(map[*trackedConn]struct{})}
}

// notifyLocked wakes the waiters of changedLocked. Serving costs nothing
// while nobody waits (only a drain does).
func (t *tracker) notifyLocked() {
	if t.changed != nil {
		close(t.changed)
		t.changed = nil
	}
}

// changedLocked returns a channel closed on the next change.
func (t *tracker) changedLocked() <-chan struct{} {
	if t.changed == nil {
		t.changed = make(chan struct{})
	}
	return t.changed
}

func (t *tracker) add(c net.Conn) *trackedConn {
	tc := &trackedConn{Conn: c, t: t, since: time.Now()}
	t.mu.Lock()
	t.conns[tc] = struct{}{}
	t.notifyLocked()
	t.mu.Unlock()
	return tc
}

func (t *tracker) remove(tc *trackedConn) {
	t.mu.Lock()
	if _, ok := t.conns[tc]; ok {
		delete(t.conns, tc)
		t.notifyLocked()
	}
	t.mu.Unlock()
}

// unwrap returns the trackedConn under c: c itself, or the connection under
// a *tls.Conn that net/http or its HTTP/2 server reports.
func unwrap(c net.Conn) (*trackedConn, *tls.Conn) {
	var tlsConn *tls.Conn
	if tc, ok := c.(*tls.Conn); ok {
		tlsConn = tc
		c = tc.NetConn()
	}
	tc, _ := c.(*trackedConn)
	return tc, tlsConn
}

// setState records an http.ConnState change reported by net/http.
func (t *tracker) setState(c net.Conn, s http.ConnState) {
	tc, tlsConn := unwrap(c)
	if tc == nil || s == http.StateClosed {
		return
	}
	if tlsConn != nil && s != http.StateNew && tlsConn.ConnectionState().NegotiatedProtocol == "h2" {
		// Only the HTTP/2 server reports states after the handshake.
		tc.h2.Store(true)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.conns[tc]; !ok {
		return
	}
	tc.tls = tlsConn
	tc.state = s
	tc.preDrain = false
	if s == http.StateIdle {
		tc.since = time.Now()
	}
	if (s == http.StateIdle || s == http.StateNew) && t.handoff != nil {
		// Claimed before net/http's next read, which then sees EOF. (A new
		// connection during a drain is one our parent handed us late.)
		tc.claimLocked()
	}
	if s == http.StateActive && tc.transition(readClaimed, readSeen) {
		// A request was already buffered in net/http (pipelining): serve it.
		tc.Conn.SetReadDeadline(time.Time{})
	}
	t.notifyLocked()
}

// count returns how many connections are in one of states (all if none).
func (t *tracker) count(states ...http.ConnState) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(states) == 0 {
		return len(t.conns)
	}
	n := 0
	for c := range t.conns {
		for _, want := range states {
			if c.state == want {
				n++
				break
			}
		}
	}
	return n
}

// waitUntil blocks until cond holds or ctx ends. cond runs without mu.
func (t *tracker) waitUntil(ctx context.Context, cond func() bool) error {
	for {
		t.mu.Lock()
		ch := t.changedLocked()
		t.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// closeAll closes every tracked connection and returns how many it closed.
func (t *tracker) closeAll() int {
	t.mu.Lock()
	conns := make([]*trackedConn, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()
	for _, c := range conns {
		c.closeNow()
	}
	return len(conns)
}

// trackedListener adds every accepted connection to its tracker.
type trackedListener struct {
	net.Listener
	t         *tracker
	closed    atomic.Bool // we closed it: Accept's error is the drain, not a failure
	closeOnce sync.Once
	closeErr  error
}

func (l *trackedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.t.add(c), nil
}

// Close stops accepting. The socket itself stays open in any successor.
func (l *trackedListener) Close() error {
	l.closeOnce.Do(func() {
		l.closed.Store(true)
		l.closeErr = l.Listener.Close()
	})
	return l.closeErr
}

// Read states of a trackedConn, which make retiring or claiming an idle
// connection atomic with respect to a request arriving on it. The state
// shares its word with readingBit, set while a Read is in the socket.
const (
	readNone    int32 = iota // nothing read since the last response began
	readSeen                 // bytes of a request were handed to net/http
	readRetired              // retired: whatever arrives is discarded
	readClaimed              // claimed for the successor: net/http gets EOF, nothing is read
	readHanded               // passed to the successor (or being passed)

	readingBit int32 = 1 << 4
)

// trackedConn removes itself from its tracker when closed, whoever closes
// it: net/http, a handler that hijacked it, or the drain.
type trackedConn struct {
	net.Conn
	t       *tracker
	rstate  atomic.Int32 // a read state | readingBit
	h2      atomic.Bool  // HTTP/2: drained by GOAWAY, never retired
	readAny atomic.Bool
	goodbye atomic.Bool // ServeConns: its goodbye was called

	// Guarded by t.mu.
	state    http.ConnState
	since    time.Time // accepted, or last went idle
	preDrain bool      // active when the drain started: its response may lack "Connection: close"
	tls      *tls.Conn

	closeOnce  sync.Once
	closeErr   error
	handOnce   sync.Once
	lingering  atomic.Bool // retired: Close waits for the read-drain or the linger timer
	lingerDone atomic.Bool
}

// rs returns the read state.
func (c *trackedConn) rs() int32 { return c.rstate.Load() &^ readingBit }

// transition moves the read state from one value to another, keeping the
// reading bit; it fails if the state is not from.
func (c *trackedConn) transition(from, to int32) bool {
	for {
		v := c.rstate.Load()
		if v&^readingBit != from {
			return false
		}
		if c.rstate.CompareAndSwap(v, to|v&readingBit) {
			return true
		}
	}
}

// beginRead sets the reading bit unless the connection is claimed or handed.
func (c *trackedConn) beginRead() bool {
	for {
		v := c.rstate.Load()
		if s := v &^ readingBit; s == readClaimed || s == readHanded {
			return false
		}
		if c.rstate.CompareAndSwap(v, v|readingBit) {
			return true
		}
	}
}

func (c *trackedConn) endRead() {
	for {
		v := c.rstate.Load()
		if c.rstate.CompareAndSwap(v, v&^readingBit) {
			return
		}
	}
}

// Read hands net/http what the peer sends, except on a retired connection
// (it discards everything until the peer closes, then reports EOF, so no
// request starts after the goodbye and closing sends no RST) and on a
// claimed one (it reads nothing and reports EOF: what the peer sends stays
// in the socket for the successor).
func (c *trackedConn) Read(b []byte) (int, error) {
	if !c.beginRead() {
		return 0, io.EOF
	}
	n, err := c.Conn.Read(b)
	if n > 0 {
		if !c.readAny.Load() {
			c.readAny.Store(true)
			if bytes.HasPrefix(b[:n], []byte("PRI ")) {
				c.h2.Store(true) // HTTP/2 with prior knowledge (h2c)
			}
		}
		if !c.transition(readNone, readSeen) && c.rs() == readClaimed {
			// Bytes beat the claim: cancel it and serve them here; undo
			// the claim's deadline under the lock that set it.
			c.t.mu.Lock()
			if c.transition(readClaimed, readSeen) {
				c.Conn.SetReadDeadline(time.Time{})
			}
			c.t.mu.Unlock()
		}
	}
	c.endRead()
	switch c.rs() {
	case readRetired:
		for err == nil {
			_, err = c.Conn.Read(b)
		}
		c.lingerDone.Store(true) // the peer closed, or the linger deadline passed
		return 0, io.EOF
	case readClaimed, readHanded:
		if n == 0 {
			return 0, io.EOF // woken by the claim's deadline
		}
	}
	return n, err
}

// Close closes the connection. A claimed connection is first passed to the
// successor (or, if that fails, retired); while a Read is in its socket,
// the pass waits for the reader, which returns EOF so that net/http closes
// again. A retired one still lingering is closed by the read-drain's end or
// the linger timer instead.
func (c *trackedConn) Close() error {
	for {
		v := c.rstate.Load()
		if v&^readingBit != readClaimed {
			break
		}
		if v&readingBit != 0 {
			return nil
		}
		if c.rstate.CompareAndSwap(v, readHanded) {
			break
		}
	}
	if c.rs() == readHanded {
		// net/http may close twice (Shutdown, and the serve goroutine):
		// the second waits for the hand-off before anything is closed.
		c.handOnce.Do(c.handOff)
	}
	if c.lingering.Load() && !c.lingerDone.Load() {
		return nil
	}
	return c.closeNow()
}

func (c *trackedConn) closeNow() error {
	if c.t.log != nil && c.rs() != readHanded {
		c.t.mu.Lock()
		if c.t.handoff != nil {
			c.t.log.Debug("connection closed, not handed over", "state", c.state.String(), "read_state", c.rstate.Load(), "remote", c.RemoteAddr().String())
		}
		c.t.mu.Unlock()
	}
	c.closeOnce.Do(func() {
		c.closeErr = c.Conn.Close()
		c.t.remove(c)
	})
	return c.closeErr
}

// CloseWrite half-closes the connection when the underlying one can, as
// net/http does before closing after an error response.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Write marks the start of a response: what is read from now on belongs to
// the next request. net/http's background read may take the first byte of
// that request before the connection is reported idle; set the mark when
// the response goes out, so that such a connection is never claimed or
// retired, instead of when it goes idle.
func (c *trackedConn) Write(b []byte) (int, error) {
	if c.rs() == readSeen {
		c.transition(readSeen, readNone)
	}
	return c.Conn.Write(b)
}

// ReadFrom keeps the sendfile/splice path of the underlying connection.
func (c *trackedConn) ReadFrom(r io.Reader) (int64, error) {
	if c.rs() == readSeen {
		c.transition(readSeen, readNone)
	}
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(c.Conn, r)
}
