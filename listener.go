package graceful

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
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
// In a new process on probation (see [Options.Probation]), Accept waits
// until the process is promoted: until then it serves only what the old
// process hands it.
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
	ln = p.gate(ln) // a canary accepts only once promoted
	p.addListener(ln, ln)
	return ln, nil
}

// ListenPacket is [Process.Listen] for datagram sockets: network is "udp",
// "udp4", "udp6" or "unixgram". The socket is passed on at upgrades like a
// listener's, but unlike a listener it is not closed when the drain starts:
// a datagram server has no connections to drain, so the server that reads
// it closes it in its stop (see [Process.Add]), and from then on every
// datagram goes to the successor.
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

// addListener registers a socket to close when the drain starts, under the
// socket it serves: Serve and ServeConns replace the entry of a listener
// from Listen with their tracked wrapper, so that each socket is closed
// once, by whoever serves it.
func (p *Process) addListener(socket any, c io.Closer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.listeners[socket]; !ok {
		p.listenOrder = append(p.listenOrder, socket)
	}
	p.listeners[socket] = c
}

// closeListeners closes every registered socket, in registration order.
func (p *Process) closeListeners() {
	p.mu.Lock()
	cs := make([]io.Closer, 0, len(p.listenOrder))
	for _, s := range p.listenOrder {
		cs = append(cs, p.listeners[s])
	}
	p.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
}
