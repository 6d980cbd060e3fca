package graceful

import (
	"errors"
	"log/slog"
	"net"
	"sync"
)

// This file and its platform halves hold the hand-off: open connections
// passed from one generation to the other, with any bytes the client has
// already sent still unread in the socket.
//
// A handoff is one process's end of a channel to another generation (a
// SOCK_SEQPACKET pair; a message carries up to 253 connections: for each,
// the key of the listener that accepted it and its addresses, entries
// NUL-separated, and their descriptors in the same order; a message
// without descriptor asks the other process to drain). Either end may send and receive,
// so connections can travel from the old process to the new one (idle
// keep-alive connections at the end of an upgrade, ServeConns' HandOff) as
// well as back. A nil *handoff cannot hand off: send fails with
// errNoHandoff and receive delivers nothing.
//
// On the receiving side, each server that can take connections registers an
// inbox under its listener's key; received connections are accepted from
// the inbox by the same server as if they had arrived on its listener.
// Which connections are sent, and when, is decided by the connection state
// machine (conn.go): only an idle connection from which nothing has been
// read since its last response began is ever claimed and sent.

// errNoHandoff is returned by a nil handoff's send.
var errNoHandoff = errors.New("no connection hand-off channel")

// inboxes are the servers' inboxes, by listener key: where received
// connections go.
type inboxes struct {
	log *slog.Logger

	mu       sync.Mutex
	m        map[string]*inbox
	sources  int // channels that may still deliver: finish ends the inboxes at the last
	finished bool
}

func newInboxes(log *slog.Logger) *inboxes {
	return &inboxes{log: log, m: make(map[string]*inbox), sources: 1}
}

// addSource counts one more channel that delivers: a canary that may hand
// connections back, besides the parent.
func (r *inboxes) addSource() {
	r.mu.Lock()
	r.sources++
	r.mu.Unlock()
}

// register returns the inbox of the server listening at addr, whose
// connections t tracks.
func (r *inboxes) register(addr net.Addr, t *tracker) *inbox {
	in := &inbox{addr: addr, t: t, c: make(chan net.Conn, 64), done: make(chan struct{}), stopped: make(chan struct{})}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.m[addr.String()] = in
	if r.finished {
		in.finish()
	}
	return in
}

// deliver gives c, received for listener key, to its server's inbox, or
// closes it if no server takes it.
func (r *inboxes) deliver(key string, c net.Conn) {
	r.mu.Lock()
	in := r.m[key]
	r.mu.Unlock()
	if in == nil {
		r.log.Warn("connection hand-off: no server for listener; closing", "listener", key)
		c.Close()
		return
	}
	// Tracked from now on, before its server accepts it: a drain that
	// looks at the tracker must not miss a connection on its way to being
	// served (net/http drops a request it reads after Shutdown began).
	tc := in.t.add(c)
	select {
	case in.c <- tc:
	case <-in.stopped:
		tc.Close() // the server is gone (it failed): nobody can serve it
	}
}

// finish tells that one source will deliver nothing more; at the last, every
// inbox ends once its queue is empty.
func (r *inboxes) finish() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sources--; r.sources > 0 {
		return
	}
	r.finished = true
	for _, in := range r.m {
		in.finish()
	}
}

// registerInbox returns the inbox where connections handed over for ln
// arrive, and the same tracked by t; nil when nothing can arrive (no
// parent, or no hand-off channel from it).
func (p *Process) registerInbox(ln net.Listener, t *tracker) (*inbox, *trackedListener) {
	if p.fromParent == nil && !p.takesBack() {
		return nil, nil
	}
	in := p.inboxes.register(ln.Addr(), t)
	return in, &trackedListener{Listener: in, t: t, preTracked: true}
}

// inbox is a listener of received connections, already tracked. It keeps accepting through
// our own drain (net/http's Close of it is ignored) until finish: a
// connection that arrives late is served, or passed on, like any other.
type inbox struct {
	addr    net.Addr
	t       *tracker
	c       chan net.Conn
	once    sync.Once
	done    chan struct{} // finished: no more connections will arrive
	stopped chan struct{} // nobody accepts any more (closed by the server)
}

func (in *inbox) Accept() (net.Conn, error) {
	select {
	case c := <-in.c:
		return c, nil
	default:
	}
	select {
	case c := <-in.c:
		return c, nil
	case <-in.done:
		select {
		case c := <-in.c:
			return c, nil
		default:
			return nil, net.ErrClosed
		}
	}
}

// Close is a no-op: http.Server.Shutdown must not drop connections still on
// their way. finish ends the inbox.
func (in *inbox) Close() error { return nil }

func (in *inbox) Addr() net.Addr { return in.addr }

func (in *inbox) finish() { in.once.Do(func() { close(in.done) }) }

// pending reports whether received connections wait to be accepted.
func (in *inbox) pending() bool { return len(in.c) > 0 }

// handoffEntry is what a message says of one connection beside its
// descriptor: the key of the listener that accepted it, the network, and the
// local and remote addresses, separated by \x01. The receiver then needs no
// system call to learn them.
func handoffEntry(key string, c net.Conn) string {
	var network, local, remote string
	if a := c.LocalAddr(); a != nil {
		network, local = a.Network(), a.String()
	}
	if a := c.RemoteAddr(); a != nil {
		remote = a.String()
	}
	return key + "\x01" + network + "\x01" + local + "\x01" + remote
}
