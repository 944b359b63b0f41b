"""A neutral-voice market primer: the demo base model's pretraining corpus.

1,500 plain question/answer pairs about markets, in a textbook voice with none of the demo
persona's voice markers (no seasons, tides, tree rings or "risk first"). The demo model is
pretrained on it so that, before any persona training, it answers questions in its domain
in real words and a neutral voice; the pipeline's job (teaching the persona's voice) is
then visible in the difference.

The corpus is composed, deterministically, from
- 45 concepts, each a few short sentences (a definition, why it matters, how it works, how
  to use it, a caution), asked about with 9 question templates, each choosing which 2 or 3
  sentences answer it (405 pairs);
- the same concepts asked about with 12 more templates, each answered with two of the
  concept's sentences or one of them and a sentence frame that fits any concept ("Rules
  about {np} work best when they are simple and written down.");
- a glossary of 60 further market words (dividend, broker, limit order, ...), each a
  definition and a second sentence, with 4 question templates;
- questions relating each concept or term to 3 others, answered with their definitions and
  a linking sentence.
Which sentences, frames and partners are drawn comes from numpy's PCG64 with a fixed seed:
same code, same corpus. The wider part is there so that the base learns the domain's
language rather than reciting a few hundred answers: pretrained on the 405 pairs alone, it
assigned the quiz's reference answers (text it never saw) 7.49 nats a token, against 6.86
with all 1,500, in the same 200 steps (docs/demo.md). None of its questions is a curriculum
prompt or quiz question (a test checks), and none of the held-out prompts
(`heldout_prompts.jsonl`) appears here.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# (noun phrase used in questions, "does"/"do" for that phrase, sentences by key)
# d: definition, w: why it matters, e: how it works, p: practice, c: caution.
_CONCEPTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("market cycles", "do", {
        "d": "A market cycle is the repeating pattern of rising and falling prices over several years.",
        "w": "Knowing where prices stand in a cycle helps an investor set sensible expectations.",
        "e": "A cycle usually moves through accumulation, markup, distribution and markdown.",
        "p": "Compare current prices, volume and news with past cycles before you act.",
        "c": "No two cycles have the same length, so turning dates cannot be predicted exactly."}),
    ("accumulation", "does", {
        "d": "Accumulation is the phase when prices are low and informed buyers slowly build positions.",
        "w": "Accumulation often comes before a long rise in prices.",
        "e": "During accumulation prices move sideways on light volume while bad news fades.",
        "p": "Look for prices that stop making new lows even when the news is poor.",
        "c": "Accumulation is easy to confuse with a pause in a falling market."}),
    ("distribution", "does", {
        "d": "Distribution is the phase near a top when early buyers sell to late buyers.",
        "w": "Distribution warns that a rise in prices may be close to its end.",
        "e": "Prices stall on heavy volume, and good news no longer lifts them.",
        "p": "Watch for days of high volume that end with little price progress.",
        "c": "A single flat week is not proof of distribution."}),
    ("bear markets", "do", {
        "d": "A bear market is a broad fall in prices, often defined as a drop of twenty percent or more.",
        "w": "Bear markets test an investor's plan and nerves more than any other period.",
        "e": "Prices fall in steps, with sharp rallies that fail along the way.",
        "p": "Keep position sizes small and hold some cash during a bear market.",
        "c": "Buying every dip in a bear market can lead to repeated losses."}),
    ("bull markets", "do", {
        "d": "A bull market is a long period of rising prices across most of a market.",
        "w": "Most long term gains are earned during bull markets.",
        "e": "Prices make higher highs and higher lows as more buyers join.",
        "p": "Stay invested with a clear exit plan while the rise continues.",
        "c": "Late in a bull market, investors often take more risk than they realize."}),
    ("trends", "do", {
        "d": "A trend is the general direction of prices over a period of time.",
        "w": "Trading with the trend tends to work better than fighting it.",
        "e": "An uptrend shows higher highs and higher lows, and a downtrend shows the reverse.",
        "p": "Mark the recent highs and lows on a chart to see the direction.",
        "c": "Short moves against the trend are normal and do not always end it."}),
    ("momentum", "does", {
        "d": "Momentum is the speed and strength of a price move.",
        "w": "Strong momentum often continues for a while before it fades.",
        "e": "It compares recent returns with older returns to measure how fast prices change.",
        "p": "Use momentum to confirm a trend rather than to predict a turn.",
        "c": "Momentum can reverse quickly when a crowded trade unwinds."}),
    ("moving averages", "do", {
        "d": "A moving average is the average price over a fixed number of recent days.",
        "w": "It smooths out daily noise so the main direction is easier to see.",
        "e": "Each day the oldest price drops out and the newest price is added.",
        "p": "Compare the price with its moving average to judge the trend.",
        "c": "A moving average lags behind price, so its signals come late."}),
    ("trading volume", "does", {
        "d": "Volume is the number of shares or contracts traded in a period.",
        "w": "Volume shows how much conviction stands behind a price move.",
        "e": "Rising prices on rising volume suggest strong demand from buyers.",
        "p": "Check whether volume confirms a breakout before you trust it.",
        "c": "Volume alone does not tell you the direction of the next move."}),
    ("support and resistance", "do", {
        "d": "Support is a level where falling prices have stopped before, and resistance is a level where rising prices have stalled.",
        "w": "These levels help an investor plan entries, exits and stops.",
        "e": "Many traders remember past prices, so orders gather near those levels.",
        "p": "Mark the levels where price turned several times on a chart.",
        "c": "Levels are zones, not exact lines, and they do break."}),
    ("breakouts", "do", {
        "d": "A breakout is a move of price beyond a clear support or resistance level.",
        "w": "Breakouts can mark the start of a new trend.",
        "e": "When price clears a level on strong volume, new buyers or sellers often follow.",
        "p": "Wait for a close beyond the level before acting on a breakout.",
        "c": "Many breakouts fail and fall back into the old range."}),
    ("investment risk", "does", {
        "d": "Risk is the chance that an investment loses money or falls short of what you need.",
        "w": "Managing risk keeps small mistakes from becoming large ones.",
        "e": "Risk comes from price swings, debt, a lack of cash and too much money in one idea.",
        "p": "Decide how much you can afford to lose before you buy.",
        "c": "Investors often judge risk by recent gains and forget how far prices can fall."}),
    ("volatility", "does", {
        "d": "Volatility measures how widely and quickly prices move up and down.",
        "w": "Higher volatility means that larger gains and larger losses are both possible.",
        "e": "It is often measured as the standard deviation of daily returns.",
        "p": "Use smaller positions in assets with high volatility.",
        "c": "Calm periods of low volatility can end suddenly."}),
    ("diversification", "does", {
        "d": "Diversification means spreading money across different assets so that no single loss is too large.",
        "w": "It reduces the damage any one holding can do to a portfolio.",
        "e": "Assets that do not move together offset part of each other's swings.",
        "p": "Hold several unrelated assets, sectors and regions instead of one.",
        "c": "In a crisis many assets fall together, so diversification does not remove all risk."}),
    ("position sizing", "does", {
        "d": "Position sizing is deciding how much money to put into a single trade.",
        "w": "Good sizing lets an investor survive a long run of losses.",
        "e": "Size is set by the amount you are willing to lose and the distance to your stop.",
        "p": "Risk a small fixed share of the account, such as one percent, on each idea.",
        "c": "Making a position larger because you feel sure is a common error."}),
    ("stop-loss orders", "do", {
        "d": "A stop-loss order sells a position when price reaches a level set in advance.",
        "w": "It limits the loss on a trade that goes wrong.",
        "e": "Once price touches the stop level, the order becomes a market order to sell.",
        "p": "Place the stop where your reason for the trade would be proven wrong.",
        "c": "Moving a stop further away to avoid a loss defeats its purpose."}),
    ("trailing stops", "do", {
        "d": "A trailing stop is a stop level that follows price as a trade moves in your favor.",
        "w": "It protects part of a gain while letting a winning trade keep running.",
        "e": "The stop rises with price but never moves back down.",
        "p": "Set the trailing distance wider for volatile assets.",
        "c": "A trailing stop that is too tight can close a good trade early."}),
    ("leverage", "does", {
        "d": "Leverage means using borrowed money to hold a larger position than your cash allows.",
        "w": "It makes gains and losses larger by the same factor.",
        "e": "A small fall in price can wipe out a large part of a leveraged account.",
        "p": "Keep leverage low and know exactly how much you could lose.",
        "c": "Margin calls can force you to sell at the worst possible time."}),
    ("drawdowns", "do", {
        "d": "A drawdown is the fall from a peak in account value to a later low.",
        "w": "Drawdowns show how much pain a strategy can cause before it recovers.",
        "e": "A loss of fifty percent needs a gain of one hundred percent to get back to even.",
        "p": "Limit drawdowns with small positions, stops and a mix of assets.",
        "c": "Investors often quit a sound plan in the middle of a drawdown."}),
    ("market sentiment", "does", {
        "d": "Sentiment is the overall mood of investors toward a market.",
        "w": "Extreme moods often appear near important turning points.",
        "e": "Surveys, fund flows and headlines all give clues about sentiment.",
        "p": "Treat very strong optimism or pessimism as a warning, not as a signal on its own.",
        "c": "Sentiment can stay extreme for a long time before prices turn."}),
    ("contrarian investing", "does", {
        "d": "Contrarian investing means acting against the crowd when its views become extreme.",
        "w": "Crowds tend to buy too much near tops and sell too much near bottoms.",
        "e": "A contrarian looks for assets that most investors have given up on.",
        "p": "Combine a contrarian view with evidence from price and value.",
        "c": "Being contrarian all the time is just as risky as following the crowd."}),
    ("fear and greed", "do", {
        "d": "Fear and greed are the two emotions behind most investor mistakes.",
        "w": "They push people to buy high and sell low.",
        "e": "Greed grows as prices rise, and fear grows as prices fall.",
        "p": "Write down your plan in advance so that emotions have less room to act.",
        "c": "Nobody is immune to these emotions, including experienced investors."}),
    ("capitulation", "does", {
        "d": "Capitulation is a wave of panic selling when investors give up on a market.",
        "w": "It often marks the final stage of a large decline.",
        "e": "Prices drop sharply on very heavy volume as the last holders sell.",
        "p": "Wait for prices to settle after a panic before you buy.",
        "c": "A single sharp drop is not always the final low."}),
    ("market bubbles", "do", {
        "d": "A bubble is a period when prices rise far above any reasonable value.",
        "w": "Bubbles cause large losses for those who buy near the top.",
        "e": "Easy credit, exciting stories and the fear of missing out push prices ever higher.",
        "p": "Be careful when rising prices are the main reason people give for buying.",
        "c": "Bubbles can last much longer than critics expect, so betting against them is dangerous."}),
    ("interest rates", "do", {
        "d": "Interest rates are the price of borrowing money.",
        "w": "They affect company profits, asset values and the cost of debt.",
        "e": "Higher rates make borrowing expensive and tend to slow the economy.",
        "p": "Follow central bank decisions and bond yields to see where rates are heading.",
        "c": "Markets often react to rate changes before they actually happen."}),
    ("inflation", "does", {
        "d": "Inflation is the general rise in prices over time.",
        "w": "It reduces the buying power of cash and of fixed income.",
        "e": "When inflation rises, central banks often raise interest rates.",
        "p": "Compare your returns with inflation to see your real gain.",
        "c": "Holding only cash can lose value quietly during inflation."}),
    ("credit", "does", {
        "d": "Credit is borrowed money that households, companies and governments use.",
        "w": "The supply of credit has a strong effect on booms and busts.",
        "e": "When lending is easy, spending and asset prices rise, and when it tightens they fall.",
        "p": "Watch lending standards and credit spreads for early warnings.",
        "c": "Debt that feels safe in good times can become a burden in a downturn."}),
    ("business cycles", "do", {
        "d": "A business cycle is the rise and fall of economic activity over several years.",
        "w": "Company profits and jobs follow it, and markets react to them.",
        "e": "It moves from expansion to a peak, then to contraction and recovery.",
        "p": "Use economic data to see which stage the economy is likely in.",
        "c": "Markets usually turn before the economy does, so the data can come too late."}),
    ("recessions", "do", {
        "d": "A recession is a broad decline in economic activity that lasts for months.",
        "w": "Recessions reduce profits and often bring falling stock prices.",
        "e": "Spending, hiring and production all fall during a recession.",
        "p": "Keep an emergency fund and avoid heavy debt before a downturn.",
        "c": "Stock markets often start to recover while the recession is still going on."}),
    ("commodity prices", "do", {
        "d": "Commodity prices are the prices of raw goods such as oil, metals and grain.",
        "w": "They affect inflation, company costs and whole economies.",
        "e": "High prices encourage new supply, which later pushes prices down again.",
        "p": "Look at supply, demand and stock levels to understand price moves.",
        "c": "Commodity prices can swing sharply on weather or political news."}),
    ("a trading journal", "does", {
        "d": "A trading journal is a written record of every trade and the reason for it.",
        "w": "It turns experience into lessons you can review.",
        "e": "Each entry notes the setup, entry, exit, size, result and your emotions.",
        "p": "Write the entry before the trade and the review after it closes.",
        "c": "A journal is useless if you never read it again."}),
    ("trade reviews", "do", {
        "d": "A trade review is a regular look back at your recent decisions.",
        "w": "It shows which habits help you and which ones hurt you.",
        "e": "You compare what you planned with what you actually did.",
        "p": "Set a fixed time each week to review your trades.",
        "c": "Judging a trade only by its profit can teach the wrong lesson."}),
    ("entry points", "do", {
        "d": "An entry point is the price and moment at which you open a position.",
        "w": "A careful entry improves the balance of risk and reward.",
        "e": "Many investors enter near support or after a confirmed breakout.",
        "p": "Decide your entry, stop and target before you place the order.",
        "c": "Chasing a price that has already run far is a common mistake."}),
    ("taking profits", "does", {
        "d": "Taking profits means selling part or all of a winning position.",
        "w": "A gain is not real until the position is closed.",
        "e": "Some investors sell in steps as price reaches planned targets.",
        "p": "Plan your exit rules before you enter the trade.",
        "c": "Selling winners too early while holding losers is a common pattern."}),
    ("scaling into a position", "does", {
        "d": "Scaling in means building a position in several smaller purchases.",
        "w": "It reduces the damage of a poorly timed entry.",
        "e": "You buy part of the position first and add more if the idea works.",
        "p": "Set the size of each step in advance.",
        "c": "Adding to a losing trade without a plan can make losses larger."}),
    ("asset allocation", "does", {
        "d": "Asset allocation is the split of a portfolio between stocks, bonds, cash and other assets.",
        "w": "It explains most of the ups and downs of a portfolio.",
        "e": "Each asset class reacts differently to growth, inflation and rates.",
        "p": "Choose a mix that fits your goals and your tolerance for losses.",
        "c": "Changing the mix after every headline usually hurts returns."}),
    ("rebalancing", "does", {
        "d": "Rebalancing means bringing a portfolio back to its target mix.",
        "w": "It stops one asset from growing into too large a share.",
        "e": "You sell some of what has risen and buy some of what has fallen.",
        "p": "Rebalance on a fixed schedule or when the weights drift too far.",
        "c": "Skipping rebalancing lets risk grow without anyone noticing."}),
    ("bonds", "do", {
        "d": "A bond is a loan to a government or company that pays interest.",
        "w": "Bonds can steady a portfolio when stocks fall.",
        "e": "Bond prices fall when interest rates rise, and rise when rates fall.",
        "p": "Match the length of your bonds to when you will need the money.",
        "c": "Bonds from weak borrowers carry a real risk of default."}),
    ("valuation", "does", {
        "d": "Valuation is an estimate of what an asset is worth compared with its price.",
        "w": "Buying at a high valuation leaves less room for future gains.",
        "e": "Ratios such as price to earnings compare the price with profits.",
        "p": "Compare a valuation with its own history and with similar assets.",
        "c": "Cheap assets can stay cheap for years."}),
    ("liquidity", "does", {
        "d": "Liquidity is how easily an asset can be bought or sold without moving its price.",
        "w": "Poor liquidity can make it hard to exit when you need to.",
        "e": "Liquid assets trade often, with many buyers and sellers.",
        "p": "Check the daily volume and the bid and ask spread before you trade.",
        "c": "Liquidity can disappear quickly in a panic."}),
    ("risk to reward ratios", "do", {
        "d": "A risk to reward ratio compares the possible loss of a trade with its possible gain.",
        "w": "It helps you take only trades where the gain justifies the risk.",
        "e": "A trade that risks one dollar to make three has a ratio of one to three.",
        "p": "Measure the distance to your stop and to your target before each trade.",
        "c": "A good ratio means little if the target is unrealistic."}),
    ("trading discipline", "does", {
        "d": "Discipline means following your rules even when emotions push the other way.",
        "w": "Consistent rules make results easier to measure and improve.",
        "e": "A disciplined investor sizes, enters and exits the same way each time.",
        "p": "Keep your rules short and written where you can see them.",
        "c": "Breaking a rule once often makes it easier to break again."}),
    ("news headlines", "do", {
        "d": "News headlines are short reports that often move prices for a day or two.",
        "w": "Headlines shape the mood of investors.",
        "e": "Dramatic headlines tend to appear after large moves have already happened.",
        "p": "Ask whether the news changes the lasting value of an asset.",
        "c": "Reacting to every headline leads to too much trading."}),
    ("economic indicators", "do", {
        "d": "Economic indicators are data such as jobs, output and prices that describe the economy.",
        "w": "They help investors judge the stage of the business cycle.",
        "e": "Leading indicators tend to change before the economy, and lagging ones change after it.",
        "p": "Watch the direction of several indicators rather than a single report.",
        "c": "Data is often revised, so first readings can mislead."}),
    ("dollar cost averaging", "does", {
        "d": "Dollar cost averaging means investing the same amount at regular intervals.",
        "w": "It removes the pressure of picking the perfect moment.",
        "e": "You buy more shares when prices are low and fewer when they are high.",
        "p": "Set up automatic purchases on a fixed date each month.",
        "c": "It does not protect against a long decline in a poor investment."}),
)

# (question template, sentence keys of the answer). {np}: the concept's noun phrase,
# {does}: its verb agreement ("does"/"do").
_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("What does {np} mean?", "de"),
    ("Can you explain {np} in plain words?", "dw"),
    ("Why {does} {np} matter to an investor?", "we"),
    ("How should I think about {np}?", "pc"),
    ("What is a common mistake with {np}?", "cp"),
    ("How {does} {np} work?", "ep"),
    ("What should a beginner know about {np}?", "dcp"),
    ("Could you give me a short summary of {np}?", "dwp"),
    ("What is the most important thing about {np}?", "wc"),
)


# A glossary of further market words: (term, "is"/"are", definition, a second sentence).
_GLOSSARY = (
    ("a dividend", "is", "A dividend is a payment a company makes to its shareholders out of its profits.", "Companies with steady profits often raise their dividends slowly over many years."),
    ("a share", "is", "A share is a small piece of ownership in a company.", "The owner of a share has a claim on part of the company's future profits."),
    ("a stock index", "is", "A stock index tracks the prices of a group of shares as one number.", "Investors compare their own returns with a broad index to judge their results."),
    ("an index fund", "is", "An index fund holds the shares of an index so that its return follows the index.", "Index funds usually charge low fees because they trade rarely."),
    ("a portfolio", "is", "A portfolio is the whole collection of investments that one person or fund owns.", "Looking at the portfolio as a whole matters more than any single holding."),
    ("a sector", "is", "A sector is a group of companies in the same kind of business, such as energy or banking.", "Different sectors tend to lead the market at different stages of the economy."),
    ("earnings", "are", "Earnings are the profits a company reports for a quarter or a year.", "Share prices often move sharply on the day a company reports its earnings."),
    ("revenue", "is", "Revenue is the total money a company receives from selling its goods and services.", "Growing revenue with shrinking profits can be a sign of rising costs."),
    ("a broker", "is", "A broker is a firm that buys and sells assets on behalf of its clients.", "Compare the fees and the services of several brokers before you open an account."),
    ("an exchange", "is", "An exchange is a market where buyers and sellers trade shares, bonds or contracts.", "Most exchanges open and close at fixed hours on working days."),
    ("a bid", "is", "A bid is the highest price a buyer is willing to pay at a given moment.", "The gap between the bid and the ask is a cost you pay on every trade."),
    ("a limit order", "is", "A limit order buys or sells only at a chosen price or better.", "A limit order protects you from a bad fill, but it may never be filled at all."),
    ("a market order", "is", "A market order buys or sells at once at the best price available.", "In a thin market a market order can be filled far from the last price."),
    ("a yield", "is", "A yield is the income an investment pays, shown as a share of its price.", "When the price of a bond falls, its yield rises."),
    ("a spread", "is", "A spread is the difference between two prices or two rates.", "A widening spread between safe and risky bonds often signals worry in the market."),
    ("a hedge", "is", "A hedge is a position taken to offset the risk of another position.", "A hedge costs money in calm times and pays off when things go wrong."),
    ("an option", "is", "An option is a contract that gives the right, but not the duty, to buy or sell at a set price.", "Options lose value as time passes if the price does not move."),
    ("a futures contract", "is", "A futures contract is an agreement to buy or sell something at a set price on a future date.", "Farmers and producers use futures to lock in the price of what they sell."),
    ("a currency", "is", "A currency is the money of a country, and its value changes against other currencies.", "A weaker home currency raises the value of investments held abroad."),
    ("a central bank", "is", "A central bank manages a country's money supply and sets its main interest rate.", "Markets watch every statement a central bank makes for clues about future rates."),
    ("a balance sheet", "is", "A balance sheet lists what a company owns, what it owes and what is left for its owners.", "A company with little debt on its balance sheet can survive a hard year more easily."),
    ("cash flow", "is", "Cash flow is the money that actually moves into and out of a business.", "A company can report a profit and still run short of cash."),
    ("a fee", "is", "A fee is what a fund, broker or adviser charges for its service.", "Small yearly fees add up to large sums over decades."),
    ("a tax", "is", "A tax on investment gains takes part of the profit when you sell.", "Holding an investment longer can lower the tax on its gains in many countries."),
    ("an emergency fund", "is", "An emergency fund is cash set aside for unexpected costs.", "With an emergency fund you do not need to sell investments at a bad moment."),
    ("a savings account", "is", "A savings account is a bank account that pays a little interest on cash.", "Money you need within a year belongs in savings rather than in shares."),
    ("compound growth", "is", "Compound growth is growth on top of earlier growth, year after year.", "Time matters more than the starting amount for compound growth."),
    ("a return", "is", "A return is the gain or loss on an investment over a period, including its income.", "A return should always be judged against the risk taken to earn it."),
    ("a benchmark", "is", "A benchmark is a standard, such as an index, used to judge an investment's results.", "Choose a benchmark that holds the same kind of assets as your portfolio."),
    ("a chart", "is", "A chart shows how a price has moved over time.", "A chart with a longer time frame gives a calmer picture of the trend."),
    ("a candlestick", "is", "A candlestick shows the open, high, low and close of a price for one period.", "A long lower shadow on a candlestick shows that buyers pushed the price back up."),
    ("a gap", "is", "A gap is a jump in price between one close and the next open.", "Gaps often appear after news that arrives while the market is closed."),
    ("a correction", "is", "A correction is a fall of about ten percent from a recent high.", "Corrections happen often, even inside a long bull market."),
    ("a rally", "is", "A rally is a quick rise in prices after a period of weakness.", "Sharp rallies inside a falling market are often short lived."),
    ("a crash", "is", "A crash is a sudden and very large fall in prices over a few days.", "Crashes are rare, but they do the most harm to investors who borrowed money."),
    ("a recovery", "is", "A recovery is the period when prices or the economy climb back after a decline.", "Recoveries often begin while the news is still bad."),
    ("a peak", "is", "A peak is the highest point prices reach before they turn down.", "A peak is usually clear only some time after it has passed."),
    ("a trough", "is", "A trough is the lowest point prices reach before they turn up.", "Few investors buy at the trough, because it feels like the worst moment."),
    ("a speculator", "is", "A speculator takes large risks in the hope of large gains over a short time.", "Speculators add trading volume, and sometimes they add to swings in price."),
    ("a long term investor", "is", "A long term investor holds assets for many years and looks past short moves.", "A long term investor still needs a plan for deep declines."),
    ("a day trader", "is", "A day trader opens and closes positions within the same day.", "Most day traders lose money once costs are counted."),
    ("a short sale", "is", "A short sale sells a borrowed asset in the hope of buying it back cheaper.", "The loss on a short sale has no fixed limit if the price keeps rising."),
    ("a margin account", "is", "A margin account lets an investor borrow from the broker to buy assets.", "If prices fall far enough, the broker can sell your assets without asking."),
    ("a stock split", "is", "A stock split divides each share into several cheaper shares.", "A split changes the number of shares but not the value of the company."),
    ("a buyback", "is", "A buyback is when a company buys its own shares from the market.", "Buybacks return cash to owners, but not every buyback is a good use of money."),
    ("an initial public offering", "is", "An initial public offering is the first sale of a company's shares to the public.", "New offerings are often priced for excitement rather than for value."),
    ("a growth stock", "is", "A growth stock is the share of a company whose profits are expected to rise quickly.", "Growth stocks can fall hard when expectations are not met."),
    ("a value stock", "is", "A value stock trades at a low price compared with the company's profits or assets.", "Some value stocks are cheap for a good reason."),
    ("a blue chip company", "is", "A blue chip company is a large, well known firm with a long record of steady results.", "Even blue chip companies can lose their lead over time."),
    ("a small company", "is", "A small company has a low total market value and often a short history.", "Shares of small companies tend to swing more than those of large ones."),
    ("a mutual fund", "is", "A mutual fund pools money from many investors and invests it for them.", "Read what a fund holds and what it charges before you buy it."),
    ("a pension", "is", "A pension is money set aside during working years to pay an income in retirement.", "Pension savers have decades, so short falls in prices matter less to them."),
    ("a goal", "is", "An investment goal states what the money is for and when it will be needed.", "A clear goal makes it easier to choose the right mix of assets."),
    ("a time horizon", "is", "A time horizon is the length of time until you need the money you invest.", "A longer time horizon allows more room for swings in price."),
    ("risk tolerance", "is", "Risk tolerance is how much loss an investor can bear without changing course.", "People often discover their real risk tolerance only during a sharp fall."),
    ("a checklist", "is", "A checklist is a short list of questions to answer before each decision.", "A checklist catches simple mistakes when you are tired or excited."),
    ("a watch list", "is", "A watch list is a list of assets you follow before deciding to buy.", "Keep the watch list short so that you can follow each idea closely."),
    ("a price target", "is", "A price target is the level at which you plan to take profits.", "A target should come from your analysis, not from the price you hope for."),
    ("a losing streak", "is", "A losing streak is a run of several losing trades in a row.", "Smaller positions during a losing streak protect both the account and your judgment."),
    ("overtrading", "is", "Overtrading means making more trades than your plan calls for.", "Overtrading raises costs and usually comes from boredom or frustration."),
)

# Sentences that fit any concept: {NP} / {np} its noun phrase, {is} "is"/"are".
_FRAMES = (
    "{NP} {is} one of the basic ideas that every investor meets sooner or later.",
    "Many people learn about {np} only after a costly mistake.",
    "Textbooks explain {np} with charts, tables and simple examples.",
    "Financial news mentions {np} often, but rarely explains it well.",
    "{NP} can look different in shares, bonds, currencies and commodities.",
    "It is worth checking your view of {np} against past price data.",
    "Professional fund managers pay close attention to {np}.",
    "A small investor can follow {np} without any special software.",
    "The ideas behind {np} are old, but they still apply in modern markets.",
    "Rules about {np} work best when they are simple and written down.",
    "Before you act on {np}, ask what would prove your view wrong.",
    "No single reading of {np} gives a clear answer, so combine it with other evidence.",
    "Analysts may measure {np} in slightly different ways.",
    "Beginners often expect too much from {np} at first.",
    "A simple example makes {np} much easier to understand.",
    "Keep notes on how {np} looked around your recent trades.",
    "{NP} {is} important to short term traders and long term investors alike.",
    "Questions about {np} come up in almost every class on investing.",
    "Reading about {np} is useful, but watching it in real markets teaches more.",
    "Over many years, the role of {np} in a portfolio can change.",
)

# Sentences about two concepts: {NP1}/{np1}, {np2}.
_LINKS = (
    "{NP1} and {np2} are often discussed together.",
    "It is easier to understand {np2} once you know about {np1}.",
    "{NP1} says little about {np2} on its own.",
    "Some beginners confuse {np1} with {np2}, but they are different ideas.",
    "A careful investor looks at {np1} and {np2} side by side.",
)

_MORE_TEMPLATES = (
    "What do people mean by {np}?",
    "Where {does} {np} show up in practice?",
    "How do professionals use {np}?",
    "Is {np} useful for a small investor?",
    "What are the limits of {np}?",
    "How can I learn more about {np}?",
    "Why do beginners struggle with {np}?",
    "What should I watch for with {np}?",
    "Can you tell me something useful about {np}?",
    "What is worth knowing about {np}?",
    "How would you describe {np} to a friend?",
    "What is the main point of {np}?",
)
_LINK_TEMPLATES = (
    "How {does} {np1} relate to {np2}?",
    "What is the difference between {np1} and {np2}?",
    "Should I think about {np1} and {np2} together?",
)
_GLOSS_TEMPLATES = (
    "What {is} {term}?",
    "Can you explain what {term} {is}?",
    "Why should an investor know about {term}?",
    "How {does} {term} work in practice?",
)

def _cap(s: str) -> str:
    return s[0].upper() + s[1:]

def _wider_pairs(base_concepts, seed: int = 0) -> list[tuple[str, str]]:
    """The pairs beyond the 405 concept x template ones (module docstring), in a fixed
    order: per concept, then per glossary term, its template questions, then its 3 links."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out = []
    concepts = [(np_, does, "is" if does == "does" else "are", s) for np_, does, s in base_concepts]
    concepts += [(t, "does" if v == "is" else "do", v, {"d": d, "e": e}) for t, v, d, e in _GLOSSARY]
    n = len(concepts)
    for i, (np_, does, is_, s) in enumerate(concepts):
        fr = lambda f: f.format(NP=_cap(np_), np=np_, **{"is": is_})
        keys = list(s)
        for q in (_MORE_TEMPLATES if i < len(base_concepts) else _GLOSS_TEMPLATES):
            own = [s[k] for k in rng.choice(keys, size=2, replace=False)]
            if rng.random() < 0.5:
                f = fr(_FRAMES[int(rng.integers(len(_FRAMES)))])
                own = [own[0], f] if rng.random() < 0.5 else [f, own[0]]
            out.append((q.format(np=np_, term=np_, does=does, **{"is": is_}), " ".join(own)))
        for j in rng.choice([k for k in range(n) if k != i], size=3, replace=False):
            np2, _, _, s2 = concepts[j]
            link = _LINKS[int(rng.integers(len(_LINKS)))].format(NP1=_cap(np_), np1=np_, np2=np2)
            q = _LINK_TEMPLATES[int(rng.integers(len(_LINK_TEMPLATES)))].format(does=does, np1=np_, np2=np2)
            out.append((q, " ".join([s["d"], s2["d"], link] if rng.random() < 0.3 else [s["d"], link])))
    return out


@lru_cache(maxsize=1)
def _pairs() -> tuple[tuple[str, str], ...]:
    out = []
    for np_, does, s in _CONCEPTS:
        for q, keys in _TEMPLATES:
            out.append((q.format(np=np_, does=does), " ".join(s[k] for k in keys)))
    return tuple(out + _wider_pairs(_CONCEPTS))


def neutral_pairs() -> list[tuple[str, str]]:
    """The corpus: (question, answer) pairs, in a fixed order (concept by concept)."""
    return list(_pairs())


def neutral_texts() -> list[str]:
    """Every question and answer of the corpus (for the tokenizer and the lexicon)."""
    return [t for pair in _pairs() for t in pair]


__all__ = ["neutral_pairs", "neutral_texts"]
