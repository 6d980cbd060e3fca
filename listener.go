package graceful

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
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

// tracker holds every connection accepted through one served listener, with
// its last HTTP state. It is the single place connections are counted.
type tracker struct {
	mu      sync.Mutex
	conns   map[*trackedConn]http.ConnState
	changed chan struct{} // closed and replaced on every change
}

func newTracker() *tracker {
	return &tracker{conns: make(map[*trackedConn]http.ConnState), changed: make(chan struct{})}
}

func (t *tracker) notifyLocked() {
	close(t.changed)
	t.changed = make(chan struct{})
}

func (t *tracker) add(c net.Conn) *trackedConn {
	tc := &trackedConn{Conn: c, t: t}
	t.mu.Lock()
	t.conns[tc] = http.StateNew
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

func (t *tracker) setState(c net.Conn, s http.ConnState) {
	tc, ok := c.(*trackedConn)
	if !ok {
		return
	}
	t.mu.Lock()
	if _, ok := t.conns[tc]; ok && s != http.StateClosed {
		t.conns[tc] = s
		t.notifyLocked()
	}
	t.mu.Unlock()
}

// count returns how many connections are in one of states (all if none).
func (t *tracker) count(states ...http.ConnState) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(states) == 0 {
		return len(t.conns)
	}
	n := 0
	for _, s := range t.conns {
		for _, want := range states {
			if s == want {
				n++
				break
			}
		}
	}
	return n
}

// waitUntil blocks until cond holds or ctx ends.
func (t *tracker) waitUntil(ctx context.Context, cond func() bool) error {
	for {
		t.mu.Lock()
		ch := t.changed
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
		c.Close()
	}
	return len(conns)
}

// trackedListener adds every accepted connection to its tracker.
type trackedListener struct {
	net.Listener
	t         *tracker
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
	l.closeOnce.Do(func() { l.closeErr = l.Listener.Close() })
	return l.closeErr
}

// trackedConn removes itself from its tracker when closed, whoever closes
// it: net/http, a handler that hijacked it, or the drain deadline.
type trackedConn struct {
	net.Conn
	t         *tracker
	closeOnce sync.Once
	closeErr  error
}

func (c *trackedConn) Close() error {
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

// ReadFrom keeps the sendfile/splice path of the underlying connection.
func (c *trackedConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(c.Conn, r)
}
