package graceful

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
)

// This file holds the hand-over of long-lived streams (WebSocket, SSE) to
// the new process, connection and all: the client sees no close and no
// reconnect. The old process's handler, told goodbye at a message boundary
// of its protocol, passes the connection with the bytes it has read but
// not consumed and a state of its own (a subscription, the last event ID)
// with HandOffStream; the new process runs the handler registered with
// OnStream for that kind, which reads those bytes first and carries on.

// maxStreamPayload bounds a stream's unread bytes and state together: they
// travel in the hand-off message beside the descriptor. Larger state
// belongs in OfferState.
const maxStreamPayload = 8 << 10

// streamKeyPrefix starts the key of a handed-over stream (no listener key
// starts with it).
const streamKeyPrefix = "\x02"

// streamsMessage tells the parent, before a new process declares itself
// ready, the kinds of stream it takes.
const streamsMessage = "\x00streams"

// streamSet is a process's stream handlers, and the streams it received.
type streamSet struct {
	mu       sync.Mutex
	handlers map[string]func(ctx context.Context, c net.Conn, state []byte)
	t        *tracker
	wg       sync.WaitGroup // handlers running (Add under mu, never once closed)
	closed   bool           // no more handlers start (guarded by mu)
	stopped  chan struct{}
}

// OnStream registers handle as what this process does with each stream of
// kind its predecessor hands over ([Process.HandOffStream]): it runs in a
// goroutine of its own with the connection (whose first reads return the
// bytes the old process had read and not consumed) and the state the old
// process passed. ctx is done when this process tells the stream goodbye,
// as [Process.Goodbye] is for a request: the handler then hands the stream
// on again, or says goodbye in its protocol. Register before [Process.Run];
// the kinds registered are what the new process accepts (the old one does
// not send a kind its successor has no handler for). Streams still open at
// the drain deadline are closed. A kind is 1 to 64 bytes without commas,
// spaces or control bytes; another, or a nil handle, panics (a programming
// error, like http.Handle's).
func (p *Process) OnStream(kind string, handle func(ctx context.Context, c net.Conn, state []byte)) {
	if kind == "" || len(kind) > 64 || strings.ContainsAny(kind, "\x00\x01\x02, ") || handle == nil {
		panic(fmt.Sprintf("graceful: OnStream: bad kind %q or nil handler", kind))
	}
	s := &p.streams
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.handlers == nil {
		s.handlers = make(map[string]func(context.Context, net.Conn, []byte))
		s.t = newTracker("streams")
		s.t.raw = true
		s.stopped = make(chan struct{})
		p.addTracker(s.t)
		p.Add(func() error { <-s.stopped; return nil }, func(ctx context.Context) error {
			close(s.stopped)
			// Streams the parent still hands over arrive until it said it
			// sends nothing more: its channel ended (it exited), or, to a
			// canary rolled back, its revert (it lives on); at most until
			// our deadline.
			if p.fromParent != nil { // none in a first generation
				select {
				case <-p.parentDone:
				case <-ctx.Done():
				}
			}
			s.mu.Lock()
			s.closed = true
			s.mu.Unlock()
			done := make(chan struct{})
			go func() { s.wg.Wait(); close(done) }()
			select {
			case <-done:
			case <-ctx.Done(): // the deadline: what is left is closed
				s.t.forced.Add(int64(s.t.live()))
				s.t.closeAll()
				<-done
			}
			return nil
		})
	}
	s.handlers[kind] = handle
}

// parentStreamsMessage tells a canary, before it starts, the kinds of
// stream the old process takes back should it be rolled back.
const parentStreamsMessage = "\x00streams-back"

// successorTakes records the kinds of stream the new process said it takes.
func (p *Process) successorTakes(kinds string) { p.successorStreams.Store(streamKindSet(kinds)) }

// parentTakes records, in a canary, the kinds of stream the old process
// takes back.
func (p *Process) parentTakes(kinds string) { p.parentStreams.Store(streamKindSet(kinds)) }

func streamKindSet(kinds string) *map[string]bool {
	m := map[string]bool{}
	for _, k := range strings.Split(kinds, ",") {
		if k != "" {
			m[k] = true
		}
	}
	return &m
}

// streamKinds lists the kinds this process takes, comma-separated.
func (p *Process) streamKinds() string {
	p.streams.mu.Lock()
	defer p.streams.mu.Unlock()
	kinds := make([]string, 0, len(p.streams.handlers))
	for k := range p.streams.handlers {
		kinds = append(kinds, k)
	}
	return strings.Join(kinds, ",")
}

// HandOffStream passes a long-lived connection to the new process while
// this one hands over (after a successful upgrade, once the stream's
// goodbye came), or, in a canary rolled back at the end of its probation
// ([Options.Probation]), back to the old process, which serves on: c is a connection the handler owns (hijacked from
// net/http, or received by an OnStream handler), unread the bytes it has
// read from c and not consumed (a partial message), state what the new
// process's OnStream handler for kind needs to carry on. Call it at a
// message boundary of the stream's protocol, with no read or write in
// progress. On success c is closed here and the handler must return
// without using it; the client keeps its connection. It fails, and c stays
// the caller's (to say goodbye on), when there is no new process to take
// it (no upgrade, [Options.NoHandOff], a platform without descriptor
// passing), the process there has no handler for kind, c is TLS (its session
// cannot move), unread and state exceed 8 KiB together, or sending fails.
func (p *Process) HandOffStream(kind string, c net.Conn, unread, state []byte) error {
	to, kinds := p.streamTarget()
	if to == nil {
		return errors.New("graceful: HandOffStream: no new process to hand the stream to")
	}
	if kinds == nil || !(*kinds)[kind] {
		return fmt.Errorf("graceful: HandOffStream: the %s takes no %q streams", p.otherProcess(), kind)
	}
	if _, ok := c.(*tls.Conn); ok {
		return errors.New("graceful: HandOffStream: a TLS stream cannot be handed over")
	}
	inner, pending := c, []byte(nil)
	if tc, ok := inner.(*trackedConn); ok {
		inner = tc.Conn
	}
	if pc, ok := inner.(*prefixConn); ok {
		pc.mu.Lock()
		pending = pc.prefix // not yet read by the handler: after what it read
		pc.mu.Unlock()
		inner = pc.Conn
	}
	all := append(append([]byte(nil), unread...), pending...)
	if len(all)+len(state) > maxStreamPayload {
		return fmt.Errorf("graceful: HandOffStream: %d bytes of unread data and state, over %d (use OfferState for large state)", len(all)+len(state), maxStreamPayload)
	}
	entry := handoffEntry(streamKeyPrefix+kind, inner) + "\x01" + base64.StdEncoding.EncodeToString(all) + "\x01" + base64.StdEncoding.EncodeToString(state)
	// While it is sent nothing may close it (the drain's deadline
	// force-closes what is left, but not a connection being handed).
	tc, tracked := c.(*trackedConn)
	if tracked && !tc.beginHandOff() {
		return fmt.Errorf("graceful: HandOffStream: connection already %v", tc.state())
	}
	err := to.sendEntry(entry, inner)
	if tracked {
		if err != nil {
			tc.to(connHanding, connSeen)
		} else {
			tc.to(connHanding, connHanded)
		}
		close(tc.handDone)
	}
	if err != nil {
		return fmt.Errorf("graceful: HandOffStream: %w", err)
	}
	c.Close()
	return nil
}

// streamTarget returns where HandOffStream passes a stream, and the kinds
// the process there takes: the new process during a hand-over, or, from a
// canary rolled back, the old process; nil when nothing takes streams.
func (p *Process) streamTarget() (*handoff, *map[string]bool) {
	switch ph := p.life.get(); {
	case ph == PhaseHandingOver && !p.opts.NoHandOff && p.toSuccessor != nil:
		return p.toSuccessor, p.successorStreams.Load()
	case ph == PhaseHandingBack && p.fromParent != nil:
		return p.fromParent, p.parentStreams.Load()
	}
	return nil, nil
}

// deliverFromParent delivers what the parent hands over; a canary gives
// each connection a slot on the probation's board first.
func (p *Process) deliverFromParent(key string, c net.Conn) {
	if b := p.board.Load(); b != nil && !strings.HasPrefix(key, streamKeyPrefix) {
		c = b.register(c)
	}
	p.deliver(key, c)
}

// deliver gives a received connection to its server's inbox, or, for a
// stream, to its OnStream handler.
func (p *Process) deliver(key string, c net.Conn) {
	if !strings.HasPrefix(key, streamKeyPrefix) {
		p.inboxes.deliver(key, c)
		return
	}
	parts := strings.Split(strings.TrimPrefix(key, streamKeyPrefix), "\x01")
	kind := parts[0]
	var unread, state []byte
	var err error
	if len(parts) == 3 {
		if unread, err = base64.StdEncoding.DecodeString(parts[1]); err == nil {
			state, err = base64.StdEncoding.DecodeString(parts[2])
		}
	} else {
		err = errors.New("malformed entry")
	}
	s := &p.streams
	s.mu.Lock()
	handle := s.handlers[kind]
	closed := s.closed
	if handle != nil && err == nil && !closed {
		s.wg.Add(1)
	}
	s.mu.Unlock()
	if err != nil || handle == nil || closed {
		p.log.Error("stream hand-off: cannot take the stream; closing it", "kind", kind, "err", err, "handler", handle != nil, "after_drain", closed)
		c.Close()
		return
	}
	tc := s.t.add(&prefixConn{Conn: c, prefix: unread})
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), ctxKey{}, p))
	p.onGoodbye(ctx, cancel, true) // at our own drain, spread like the others
	go func() {
		defer s.wg.Done()
		defer cancel()
		defer tc.Close()
		handle(ctx, tc, state)
	}()
}

// prefixConn is a received stream: its first reads return the bytes the
// old process had read and not consumed.
type prefixConn struct {
	net.Conn
	mu     sync.Mutex
	prefix []byte
}

func (c *prefixConn) Read(b []byte) (int, error) {
	c.mu.Lock()
	if len(c.prefix) > 0 {
		n := copy(b, c.prefix)
		c.prefix = c.prefix[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.Conn.Read(b)
}

// CloseWrite half-closes, when the connection under it can.
func (c *prefixConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
